"""`noop-rt batch`: classify many images offline, in process or on Ray Data, resumable, nothing lost.

Pipeline: expand inputs -> skip paths already in the output -> decode + preprocess -> classify in batches of B images
(one B*C UNet call each, chunked to the max batch) -> append a part file per batch -> at the end merge everything into
the output (parquet or jsonl) atomically. A crash leaves the part files: re-running with the same --out resumes.
Every input path appears exactly once in the output; an unreadable image gets an `error` row.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from noop_rt.data import IMAGE_SUFFIXES, is_uri, load_image
from noop_rt.errors import BadInputError

OUTPUT_SUFFIXES = (".parquet", ".jsonl")
COLUMNS = ("path", "label", "prob", "top_classes", "top_probs", "top_errors", "method", "backend", "unet_evals",
           "model_id", "error")


# ---------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: Iterable[str]) -> list[str]:
    """Image files, folders (recursive), globs, or .txt/.parquet lists of paths -> unique paths in input order.
    A path that does not exist stays in the list: it becomes an error row, never a silent drop."""
    out: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not is_uri(item) and p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif item.endswith(".txt") and (is_uri(item) or p.is_file()):
            out += [ln.strip() for ln in _read_text(item).splitlines() if ln.strip() and not ln.startswith("#")]
        elif item.endswith(".parquet") and (is_uri(item) or p.is_file()):
            out += _parquet_paths(item)
        elif not is_uri(item) and any(ch in item for ch in "*?[") and not p.exists():
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise BadInputError(f"no files match {item}")
            out += [m for m in matches if Path(m).is_file()]
        else:
            out.append(item)
    return list(dict.fromkeys(out))


def _read_text(path: str) -> str:
    from noop_rt.data import read_bytes

    return read_bytes(path).decode("utf-8")


def _parquet_paths(path: str) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    names = [n for n in ("path", "image", "file", "uri") if n in table.column_names]
    strings = [f.name for f in table.schema if str(f.type) in ("string", "large_string")]
    column = names[0] if names else (strings[0] if strings else None)
    if column is None:
        raise BadInputError(f"{path} has no string column of paths (expected a 'path' column)")
    return [str(v) for v in table.column(column).to_pylist() if v]


# ---------------------------------------------------------------------------------------------- output file
def output_format(out: Path) -> str:
    if out.suffix not in OUTPUT_SUFFIXES:
        raise BadInputError(f"--out must end in .parquet or .jsonl, got {out}")
    return out.suffix[1:]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError variants
            raise BadInputError(f"cannot read existing output {path}: {str(exc).splitlines()[0]}") from None
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise BadInputError(f"cannot read existing output {path}: line {n} is not JSON") from None
    return rows


def write_rows_atomic(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), tmp)
        else:
            with open(tmp, "w") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _schema():
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("label", pa.string()), ("prob", pa.float64()),
                      ("top_classes", pa.list_(pa.string())), ("top_probs", pa.list_(pa.float64())),
                      ("top_errors", pa.list_(pa.float64())), ("method", pa.string()), ("backend", pa.string()),
                      ("unet_evals", pa.int64()), ("model_id", pa.string()), ("error", pa.string())])


def parts_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.parts")


def read_parts(folder: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if folder.is_dir():
        for part in sorted(folder.glob("part-*.jsonl")):
            rows += [json.loads(ln) for ln in part.read_text().splitlines() if ln.strip()]
    return rows


def write_part(folder: Path, index: int, rows: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".part-{index:06d}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(folder / f"part-{index:06d}.jsonl")


# ---------------------------------------------------------------------------------------------- classification
@dataclass
class BatchOptions:
    method: str | None = None
    noises: int = 100
    seed: int = 0
    loss: str | None = None
    top_k: int = 5
    batch_size: int = 16  # images per classification call
    ray: bool = False
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    fail_after_batches: int | None = None  # testing hook: raise after this many batches (simulates a crash)


def model_id(classifier: Any, req: Any, method: str, noises: int) -> str:
    """Identity of what produced a row: the bundle/ckpt/model, the classes and the strategy."""
    from noop_rt.bundle import sha256_file

    if getattr(classifier.backend, "bundle", None) is not None:
        source = "bundle:" + classifier.backend.bundle.manifest.get("cache_key", "")
    elif req.ckpt is not None:
        source = "ckpt:" + sha256_file(Path(req.ckpt))
    else:
        source = "model:" + str(req.model)
    blob = json.dumps({"source": source, "classes": classifier.classes, "method": method,
                       "noises": None if method == "noop" else noises})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def decode_batch(paths: list[str], resolution: int) -> tuple[np.ndarray, list[str | None]]:
    """(images (B, 3, R, R) float32 — zeros where decoding failed, per-path error message or None)."""
    images = np.zeros((len(paths), 3, resolution, resolution), dtype=np.float32)
    errors: list[str | None] = []
    for i, path in enumerate(paths):
        try:
            images[i] = load_image(path, resolution)
            errors.append(None)
        except BadInputError as exc:
            errors.append(str(exc))
    return images, errors


def classify_decoded(classifier: Any, options: Any, top_k: int, ident: str, paths: list[str], images: np.ndarray,
                     errors: list[str | None]) -> list[dict[str, Any]]:
    """Rows for one batch: the good images classified together (one B*C UNet batch), error rows for the rest."""
    import torch

    from noop_rt.runtime.classifier import predict_arrays

    good = [i for i, e in enumerate(errors) if e is None]
    preds = {}
    if good:
        arrays = [torch.from_numpy(np.ascontiguousarray(images[i])) for i in good]
        out, _, _ = predict_arrays(classifier, arrays, options, top_k)
        preds = dict(zip(good, out, strict=True))
    rows = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {"path": path, "label": None, "prob": None, "top_classes": None, "top_probs": None,
                               "top_errors": None, "method": options.method, "backend": classifier.backend.name,
                               "unet_evals": 0, "model_id": ident, "error": errors[i]}
        if i in preds:
            top = preds[i].top
            row.update(label=top[0]["class"], prob=top[0]["prob"], top_classes=[t["class"] for t in top],
                       top_probs=[t["prob"] for t in top], top_errors=[t["error"] for t in top],
                       unet_evals=preds[i].unet_evals)
        rows.append(row)
    return rows


@dataclass
class BatchReport:
    out: Path
    total: int
    skipped: int
    classified: int
    failed: int
    seconds: float
    images_per_s: float
    backend: str
    mode: str
    first_error: str | None = None  # the error of the first new row that failed


def run_batch(inputs: list[str], out: Path, req: Any, options: BatchOptions, log: Any = sys.stderr,
              show_progress: bool = True) -> BatchReport:
    """Classify every input path into `out`, resuming from what `out` (and unfinished part files) already hold."""
    from noop_rt.runtime.classifier import StrategyOptions
    from noop_rt.runtime.loader import open_classifier

    out = Path(out)
    output_format(out)
    paths = expand_inputs(inputs)
    if not paths:
        raise BadInputError("no input images")
    classifier = open_classifier(req)
    method = options.method or classifier.default_method()
    classifier.check_method(method)
    strategy = StrategyOptions(method=method, noises=options.noises, seed=options.seed, loss=options.loss)
    ident = model_id(classifier, req, method, options.noises)
    existing = read_rows(out)
    parts = parts_dir(out)
    previous = existing + read_parts(parts)
    foreign = {r.get("model_id") for r in previous} - {ident}
    if foreign:
        raise BadInputError(f"{out} holds results of another bundle, class list or method (model id "
                            f"{sorted(map(str, foreign))[0]} != {ident}); choose another --out")
    done = {r["path"] for r in previous}
    todo = [p for p in paths if p not in done]
    skipped = len(paths) - len(todo)
    if skipped:
        print(f"resuming: skipped {skipped} path(s) already in {out}", file=log)
    start = time.perf_counter()
    next_part = len(list(parts.glob("part-*.jsonl"))) if parts.is_dir() else 0
    if todo:
        runner = _run_ray if options.ray else _run_in_process
        runner(todo, classifier, req, strategy, ident, options, parts, next_part, show_progress)
    new_rows = read_parts(parts)
    merged: dict[str, dict[str, Any]] = {}
    for row in existing + new_rows:
        merged.setdefault(row["path"], row)
    order = {p: i for i, p in enumerate(paths)}
    rows = sorted(merged.values(), key=lambda r: order.get(r["path"], len(order)))
    write_rows_atomic(rows, out)
    shutil.rmtree(parts, ignore_errors=True)
    seconds = time.perf_counter() - start
    fresh = [r for r in new_rows if r["path"] in set(todo)]
    failed = sum(1 for r in fresh if r.get("error"))
    first_error = next((f"{r['path']}: {r['error']}" for r in fresh if r.get("error")), None)
    return BatchReport(out, len(paths), skipped, len(fresh) - failed, failed, seconds,
                       len(fresh) / seconds if seconds > 0 and fresh else 0.0, classifier.backend.name,
                       "ray" if options.ray else "in-process", first_error)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _run_in_process(todo: list[str], classifier: Any, req: Any, strategy: Any, ident: str, options: BatchOptions,
                    parts: Path, next_part: int, show_progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc="batch", unit="img", file=sys.stderr, disable=not show_progress)
    for n, chunk in enumerate(_chunks(todo, options.batch_size)):
        if options.fail_after_batches is not None and n >= options.fail_after_batches:
            raise RuntimeError(f"simulated crash after {n} batches")
        images, errors = decode_batch(chunk, classifier.backend.resolution)
        rows = classify_decoded(classifier, strategy, options.top_k, ident, chunk, images, errors)
        write_part(parts, next_part + n, rows)
        bar.update(len(chunk))
    bar.close()


class _RayClassifier:
    """One Ray actor per worker: opens the bundle's sessions and cached class embeddings once."""

    def __init__(self, req: Any, strategy: dict[str, Any], top_k: int, ident: str, threads: int) -> None:
        import torch

        from noop_rt.runtime.classifier import StrategyOptions
        from noop_rt.runtime.loader import open_classifier

        torch.set_num_threads(max(1, threads))
        self.classifier = open_classifier(req)
        self.strategy = StrategyOptions(**strategy)
        self.top_k, self.ident = top_k, ident

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        errors = [str(e) if e else None for e in batch["error"]]
        rows = classify_decoded(self.classifier, self.strategy, self.top_k, self.ident, paths,
                                np.asarray(batch["image"], dtype=np.float32), errors)
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object)}


def _decode_for_ray(resolution: int) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch["path"]]
        images, errors = decode_batch(paths, resolution)
        return {"path": np.array(paths, dtype=object), "image": images,
                "error": np.array([e or "" for e in errors], dtype=object)}

    return decode


def _run_ray(todo: list[str], classifier: Any, req: Any, strategy: Any, ident: str, options: BatchOptions,
             parts: Path, next_part: int, show_progress: bool) -> None:
    try:
        import ray
    except ImportError:
        from noop_rt.errors import MissingDependencyError

        raise MissingDependencyError("--ray needs Ray Data: pip install 'noop-rt[ray]'") from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from an offline cluster
    address = options.ray_address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = show_progress
        cpus = float(ray.cluster_resources().get("CPU", 1))
        workers = max(1, options.workers)
        # Leave one CPU to the decode tasks: on a 2-core machine a pool that takes every CPU deadlocks Ray Data.
        actor_cpus = 1.0 if options.gpus_per_worker else max(0.25, min(1.0, (cpus - 1) / workers))
        ds = ray.data.from_items([{"path": p} for p in todo])
        ds = ds.map_batches(_decode_for_ray(classifier.backend.resolution), batch_size=options.batch_size,
                            num_cpus=1)
        ds = ds.map_batches(
            _RayClassifier, batch_size=options.batch_size, concurrency=workers, num_cpus=actor_cpus,
            num_gpus=options.gpus_per_worker or None,
            fn_constructor_kwargs={"req": req, "strategy": asdict(strategy), "top_k": options.top_k,
                                   "ident": ident, "threads": int(max(1, actor_cpus))})
        for n, batch in enumerate(ds.iter_batches(batch_size=options.batch_size, batch_format="numpy")):
            if options.fail_after_batches is not None and n >= options.fail_after_batches:
                raise RuntimeError(f"simulated crash after {n} batches")
            write_part(parts, next_part + n, [json.loads(r) for r in batch["row"]])
    finally:
        if started_here:
            ray.shutdown()
