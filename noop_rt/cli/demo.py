"""`noop-rt demo` and `noop-rt demo-data`: the built-in model's table, and its digits as image folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from noop_rt.cli.classify import print_results
from noop_rt.cli.main import app, guarded
from noop_rt.cli.options import (
    BackendOpt,
    JsonOpt,
    MethodOpt,
    NoisesOpt,
    check_choices,
    load_request,
    open_model,
)
from noop_rt.demo import SHOTS, VAL_SHOTS
from noop_rt.runtime.errors import BadInputError, MissingDependencyError


# ---------------------------------------------------------------------------------------------- demo
@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(metavar="DIR", help="Folder to write train/ val/ test/ image-folder trees "
                                        "into.")],
    shots: Annotated[int, typer.Option("--shots", min=1, help="Training images per class.")] = SHOTS,
    val_shots: Annotated[int, typer.Option("--val-shots", min=1, help="Validation images per class.")] = VAL_SHOTS,
) -> None:
    """Write the demo's digits split (few-shot train, val, held-out test) as image folders."""
    def go() -> None:
        from noop_rt.demo.digits import write_image_folders
        from noop_rt.runtime.backends.base import installed
        from noop_rt.runtime.extras import install_hint

        if not installed("sklearn"):
            raise MissingDependencyError(f"`noop-rt demo-data` reads scikit-learn's digits: {install_hint('train')} "
                                         "(or pip install scikit-learn)")

        if out.exists() and any(out.iterdir()):
            raise BadInputError(f"{out} exists and is not empty")
        counts = write_image_folders(out, shots, val_shots)
        print(f"wrote {out}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))

    guarded(go)


@app.command()
def demo(backend: BackendOpt = "auto", method: MethodOpt = None, noises: NoisesOpt = None,
         as_json: JsonOpt = False) -> None:
    """Classify the bundled example digits with the built-in demo and print a table."""
    def go() -> None:
        from noop_rt.demo import EXAMPLES_DIR

        check_choices(backend, method, None)
        images = sorted(EXAMPLES_DIR.glob("*.png"))
        if not images:
            raise BadInputError(f"no example images in {EXAMPLES_DIR}")
        classifier = open_model(load_request(backend=backend, method=method, noises=noises))
        print_results(images, classifier, 3, as_json, truth_table=not as_json)

    guarded(go)


