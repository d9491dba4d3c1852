"""`noop-rt verify BUNDLE`: the full check that opening skips: every file's sha256, every graph loads in
onnxruntime with the tensors the manifest names, the class embeddings and the tokenizer read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noop_rt.runtime.bundle import Bundle
from noop_rt.runtime.errors import BundleError
from noop_rt.runtime.graph_specs import TEXT_ENCODER


def verify_bundle(root: str | Path) -> dict[str, Any]:
    bundle = Bundle.open(root, verify="all")
    checks = [f"sha256 of {len(bundle.manifest['files'])} files",
              "class names and prompts agree with those the classifier graph was exported for"]
    emb = bundle.class_embeddings()
    checks.append(f"class_embeddings.npy: {emb.shape} float32 for {len(bundle.classes)} classes")
    if bundle.has(TEXT_ENCODER):
        ids = bundle.tokenize(list(bundle.manifest["prompts"]))
        checks.append(f"tokenizer: {ids.shape[0]} prompts to {ids.shape[1]} tokens")
    else:
        checks.append("no text encoder nor tokenizer (exported with --no-text-encoder): the trained classes only")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, spec in bundle.graphs.items():
        path = bundle.path(name)
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise BundleError(f"{path} does not load: {str(exc).strip().splitlines()[0]}") from None
        have_in = {i.name for i in session.get_inputs()}
        have_out = {o.name for o in session.get_outputs()}
        want_in = {t.name for t in spec.inputs} - ({"class_embeddings"} if name == "classifier" else set())
        if not want_in <= have_in or not {t.name for t in spec.outputs} <= have_out:
            raise BundleError(f"{path} has inputs {sorted(have_in)} and outputs {sorted(have_out)}, not the "
                              f"manifest's {sorted(want_in)} -> {sorted(t.name for t in spec.outputs)}")
        checks.append(f"{path.name} loads: {', '.join(sorted(have_in))} -> {', '.join(sorted(have_out))}")
    size = sum(int(r["size"]) for r in bundle.manifest["files"].values())
    return {"bundle": str(bundle.root), "passed": True, "files": len(bundle.manifest["files"]), "bytes": size,
            "checks": checks}
