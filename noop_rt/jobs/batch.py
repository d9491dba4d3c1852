"""`noop-rt batch`: classify many images offline, in process or on Ray Data, resumable, nothing lost.

Pipeline: expand inputs -> skip paths already in the output -> decode + preprocess (numpy) -> classify in batches of B
images (`Classifier.classify` of the decoded batch: B*C UNet batches up to the max batch) -> append a part file per
batch -> at the end merge everything into the output (parquet or jsonl) atomically. A crash or Ctrl-C leaves the part
files: re-running with the same --out resumes. Every input path appears exactly once in the output; an unreadable image
gets an `error` row. The model is opened with `noop_rt.load(load)`: a bundle never imports torch."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from noop_rt.runtime.errors import BadInputError, ReportedInterrupt
from noop_rt.runtime.images import IMAGE_SUFFIXES, is_uri, load_image

if TYPE_CHECKING:
    from noop_rt.api import LoadOptions

OUTPUT_SUFFIXES = (".parquet", ".jsonl")
COLUMNS = ("path", "label", "prob", "top_classes", "top_probs", "top_errors", "method", "backend", "unet_evals",
           "escalated", "model_id", "error")


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
    from noop_rt.runtime.images import read_bytes

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
                      ("unet_evals", pa.int64()), ("escalated", pa.bool_()), ("model_id", pa.string()),
                      ("error", pa.string())])


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
    top_k: int = 5
    batch_size: int = 16  # images per classification call
    ray: bool = False
    ray_address: str | None = None
    workers: int = 1
    gpus_per_worker: float = 0.0
    threads: int | None = None  # engine threads per call in flight (None: the measured default, jobs/parallel.py)
    concurrency: int | None = None  # classification calls in flight in process (None: the measured default)
    ray_block_size: int | None = None  # paths per Ray actor call (None: ray_block_size())
    fail_after_batches: int | None = None  # testing hook: raise after this many batches (simulates a crash)


def model_id(classifier: Any) -> str:
    """Identity of what produced a row: the model (its fingerprint: bundle cache key, checkpoint sha256 or folder
    fingerprint), the classes and their prompts, the method and its resolved strategy settings."""
    info = classifier.model.info
    config = classifier.config()
    settings: dict[str, Any] = {}
    for key, value in asdict(config).items():
        if isinstance(value, np.ndarray):  # explicit noises: their content, not their repr
            value = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        settings[key] = value
    blob = json.dumps({"model": info.fingerprint or f"{info.source}:{info.location}", "classes": classifier.classes,
                       "prompts": list(classifier.class_set.prompts), "method": classifier.method,
                       "strategy": settings}, sort_keys=True, default=str)
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


def classify_decoded(classifier: Any, top_k: int, ident: str, paths: list[str], images: np.ndarray,
                     errors: list[str | None]) -> list[dict[str, Any]]:
    """Rows for one batch: the good images classified together (B*C UNet batches), error rows for the rest."""
    good = [i for i, e in enumerate(errors) if e is None]
    preds = {}
    if good:
        arrays = np.ascontiguousarray(images[good], dtype=np.float32)
        results = classifier.classify(arrays, top_k=top_k)
        preds = dict(zip(good, results, strict=True))
    rows = []
    for i, path in enumerate(paths):
        row: dict[str, Any] = {"path": path, "label": None, "prob": None, "top_classes": None, "top_probs": None,
                               "top_errors": None, "method": classifier.method, "backend": classifier.backend,
                               "unet_evals": 0, "escalated": None, "model_id": ident, "error": errors[i]}
        if i in preds:  # the `classify --json` object, in columns
            answer = preds[i].to_json()
            top = answer["top"]
            row.update(label=top[0]["class"], prob=top[0]["prob"], top_classes=[t["class"] for t in top],
                       top_probs=[t["prob"] for t in top], top_errors=[t["error"] for t in top],
                       unet_evals=answer["unet_evals"], escalated=answer.get("escalated"))
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
    drift: dict[str, Any] | None = None  # the drift monitor's report (in-process runs of a calibrated NoOp model)
    engine: dict[str, Any] | None = None  # how it ran: in process the EnginePlan, on Ray the pool and its timings


def run_batch(inputs: list[str], out: Path, load: LoadOptions, options: BatchOptions, log: Any = None,
              show_progress: bool = True) -> BatchReport:
    """Classify every input path into `out`, resuming from what `out` (and unfinished part files) already hold.

    `load`: what `noop_rt.load` opens, here and in every Ray worker. A bundle never imports torch. Ctrl-C keeps the
    rows done so far in part files, says so on `log` (stderr) and raises ReportedInterrupt (a KeyboardInterrupt)."""
    from noop_rt.api import load as open_model

    log = sys.stderr if log is None else log
    out = Path(out)
    output_format(out)
    paths = expand_inputs(inputs)
    if not paths:
        raise BadInputError("no input images")
    opened = time.perf_counter()
    classifier = open_model(load)
    classifier.report_to(log)
    ident = model_id(classifier)
    backend, resolution = classifier.backend, classifier.resolution
    existing = read_rows(out)
    parts = parts_dir(out)
    in_parts = read_parts(parts)
    foreign = {r.get("model_id") for r in existing + in_parts} - {ident}
    if foreign:
        classifier.close()
        raise BadInputError(f"{out} holds results of another bundle, class list or method (model id "
                            f"{sorted(map(str, foreign))[0]} != {ident}); choose another --out")
    in_out = {r["path"] for r in existing}
    done = in_out | {r["path"] for r in in_parts}
    todo = [p for p in paths if p not in done]
    skipped = len(paths) - len(todo)
    if skipped:
        from_out = sum(1 for p in paths if p in in_out)
        where = [f"{from_out} in {out}"] if from_out else []
        if skipped > from_out:
            where.append(f"{skipped - from_out} in the unfinished part files {parts}{os.sep}")
        print(f"resuming: skipped {skipped} path(s) already done ({', '.join(where)})", file=log)
    start = time.perf_counter()
    engine: dict[str, Any] | None = None
    classifiers = [classifier]
    try:
        if options.ray:
            classifier.close()  # the actors open their own; the driver holds no model (nor GPU memory)
            if todo:
                engine = _run_ray(todo, load, resolution, ident, options, parts, _next_part(parts), show_progress,
                                  backend, classifier.device)
        else:
            from noop_rt.jobs.parallel import open_classifiers, plan

            chosen = plan(classifier.backend, classifier.device, options.threads or load.threads, options.concurrency)
            engine = chosen.to_json()
            if todo:
                classifiers = open_classifiers(load, classifier, chosen)
                classifier = classifiers[0]
                engine["model_load_s"] = time.perf_counter() - opened
                engine.update(_run_in_process(todo, classifiers, chosen.concurrency, ident, options, parts,
                                              _next_part(parts), show_progress))
        new_rows = read_parts(parts)
        merged: dict[str, dict[str, Any]] = {}
        for row in existing + new_rows:
            merged.setdefault(row["path"], row)
        order = {p: i for i, p in enumerate(paths)}
        rows = sorted(merged.values(), key=lambda r: order.get(r["path"], len(order)))
        write_rows_atomic(rows, out)
    except KeyboardInterrupt:
        print(f"interrupted: {_kept(out, parts)}; re-run the same command to resume", file=log)
        raise ReportedInterrupt from None
    except Exception:
        if _next_part(parts):  # a crash after some batches: say that they are not lost
            print(f"stopped: {_kept(out, parts)}; re-run the same command to resume", file=log)
        raise
    finally:
        for c in classifiers:
            c.close()
    shutil.rmtree(parts, ignore_errors=True)
    seconds = time.perf_counter() - start
    wanted = set(todo)
    fresh = [r for r in new_rows if r["path"] in wanted]
    failed = sum(1 for r in fresh if r.get("error"))
    first_error = next((f"{r['path']}: {r['error']}" for r in fresh if r.get("error")), None)
    backend = next((str(r["backend"]) for r in fresh if r.get("backend")), backend)  # Ray: what the actors ran
    drift = classifier.drift.report() if classifier.drift is not None and not options.ray and fresh else None
    return BatchReport(out, len(paths), skipped, len(fresh) - failed, failed, seconds,
                       len(fresh) / seconds if seconds > 0 and fresh else 0.0, backend,
                       "ray" if options.ray else "in-process", first_error, drift, engine)


def _next_part(parts: Path) -> int:
    """The index after the highest part file (part files of an interrupted run stay; new ones go after them)."""
    numbers = [int(p.stem.removeprefix("part-")) for p in parts.glob("part-*.jsonl")] if parts.is_dir() else []
    return max(numbers, default=-1) + 1


def _kept(out: Path, parts: Path) -> str:
    """Where the rows done so far are, for the Ctrl-C line."""
    in_parts = len(read_parts(parts))
    try:
        in_out = len(read_rows(out))
    except BadInputError:
        in_out = 0
    where = []
    if in_parts:
        where.append(f"{in_parts} in the unfinished part files {parts}{os.sep}")
    if in_out:
        where.append(f"{in_out} in {out}")
    return f"kept {in_parts + in_out} row(s) ({', '.join(where)})" if where else "no rows were written yet"


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _run_in_process(todo: list[str], classifiers: list[Any], concurrency: int, ident: str, options: BatchOptions,
                    parts: Path, next_part: int, show_progress: bool) -> dict[str, Any]:
    """`concurrency` batches in flight (jobs/parallel.py), decoded ahead in a thread of their own, written as part
    files in input order. Returns the timings: first rows (the first batch, engine warm-up included) and the steady
    state (images/s after it)."""
    from tqdm import tqdm

    from noop_rt.jobs.parallel import ordered

    resolution = classifiers[0].resolution

    def infer(slot: int, decoded: tuple[list[str], np.ndarray, list[str | None]]) -> list[dict[str, Any]]:
        chunk, images, errors = decoded
        return classify_decoded(classifiers[slot % len(classifiers)], options.top_k, ident, chunk, images, errors)

    def decode(chunk: list[str]) -> tuple[list[str], np.ndarray, list[str | None]]:
        return (chunk, *decode_batch(chunk, resolution))

    chunks = list(_chunks(todo, options.batch_size))
    if options.fail_after_batches is not None:  # the testing hook: the batches after it never run
        chunks = chunks[:options.fail_after_batches + 1]
    start = time.perf_counter()
    first_s, first_n, done = None, 0, 0
    results = ordered(chunks, decode, infer, concurrency)
    with tqdm(total=len(todo), desc="batch", unit="img", file=sys.stderr, disable=not show_progress) as bar:
        try:
            for n, rows in enumerate(results):
                if options.fail_after_batches is not None and n >= options.fail_after_batches:
                    raise RuntimeError(f"simulated crash after {n} batches")
                write_part(parts, next_part + n, rows)
                bar.update(len(rows))
                done += len(rows)
                if first_s is None:
                    first_s, first_n = time.perf_counter() - start, done
        finally:
            results.close()
    total_s = time.perf_counter() - start
    steady = (done - first_n) / (total_s - first_s) if first_s is not None and total_s > first_s else None
    return {"mode": "in-process", "first_rows_s": first_s, "steady_images_per_s": steady}


class _RayClassifier:
    """One Ray actor per worker: opens its classifier(s) once (the engine plan the driver chose for the actor's share
    of the cores), then decodes and classifies whole blocks of paths: no decode tasks, no images in the object
    store, only paths in and JSON rows out."""

    def __init__(self, load: LoadOptions, top_k: int, ident: str, batch_size: int, engine: dict[str, Any]) -> None:
        from noop_rt.api import load as open_model
        from noop_rt.jobs.parallel import EnginePlan, open_classifiers

        t0 = time.perf_counter()
        self.engine = EnginePlan(**engine)
        want = load.updated(threads=self.engine.threads)
        self.classifiers = open_classifiers(want, open_model(want), self.engine)
        self.top_k, self.ident, self.batch_size = top_k, ident, batch_size
        self.load_s = time.perf_counter() - t0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from noop_rt.jobs.parallel import ordered

        cpu0, t_start = time.process_time(), time.time()
        resolution = self.classifiers[0].resolution

        def infer(slot: int, decoded: tuple[list[str], np.ndarray, list[str | None]]) -> list[dict[str, Any]]:
            return classify_decoded(self.classifiers[slot % len(self.classifiers)], self.top_k, self.ident,
                                    *decoded)

        def decode(chunk: list[str]) -> tuple[list[str], np.ndarray, list[str | None]]:
            return (chunk, *decode_batch(chunk, resolution))

        rows: list[dict[str, Any]] = []
        for part in ordered(_chunks([str(p) for p in batch["path"]], self.batch_size), decode, infer,
                            self.engine.concurrency):
            rows += part
        n = len(rows)
        cpu = (time.process_time() - cpu0) / max(n, 1)
        return {"row": np.array([json.dumps(r) for r in rows], dtype=object),
                "pid": np.full(n, os.getpid(), dtype=np.int64), "cpu_s": np.full(n, cpu, dtype=np.float64),
                "load_s": np.full(n, self.load_s, dtype=np.float64), "t_start": np.full(n, t_start),
                "t_end": np.full(n, time.time())}


def ray_block_size(options: BatchOptions, images: int) -> int:
    """Paths per Ray block (one actor call): `--ray-block-size`, else large enough that Ray's per-call cost is
    amortised (up to 8 classification calls) yet every worker gets at least four blocks."""
    if options.ray_block_size:
        return options.ray_block_size
    per_worker = -(-images // (4 * max(1, options.workers)))
    return max(options.batch_size, min(8 * options.batch_size, per_worker))


def steady_rate(rows: list[tuple[int, float, float, int]]) -> float | None:
    """Images/s once every actor has finished its first call (model loaded, engine warm), from the actors' own
    clocks: the images of the calls that started after that moment over the time from it to the last call's end.
    (The driver's clock would count blocks the actors finished while the driver waited for the first one.)"""
    calls = sorted({(pid, start, end) for pid, start, end, _ in rows})
    first_end: dict[int, float] = {}
    for pid, _, end in calls:
        first_end[pid] = min(first_end.get(pid, end), end)
    if not first_end:
        return None
    t0 = max(first_end.values())
    later = [r for r in rows if r[1] >= t0]
    span = max((r[2] for r in later), default=t0) - t0
    return sum(r[3] for r in later) / span if span > 0 else None


def actor_cpu_share(ray: Any, workers: int) -> float:
    """CPUs per actor: the cluster's CPUs split between the workers, but never more than the largest node has (an
    actor lives on one node)."""
    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    cpus = float(ray.cluster_resources().get("CPU", 1))
    return max(0.25, min(cpus / workers, max(nodes, default=cpus) or cpus))


def _run_ray(todo: list[str], load: LoadOptions, resolution: int, ident: str, options: BatchOptions,
             parts: Path, next_part: int, show_progress: bool, backend: str = "onnxruntime",
             device: str = "cpu") -> dict[str, Any]:
    """Ray Data: an actor pool of `workers` classifiers, each decoding and classifying whole blocks of paths.
    Returns the plan and its timings: cluster start, first rows (actor start + model load + first block), steady
    state (images/s after the first block), and per worker process its model-load time and CPU time per image. A
    cluster started here listens on loopback only (`runtime/local_ray.py`)."""
    from noop_rt.runtime.local_ray import LOCAL_INIT, loopback_cluster

    address = options.ray_address or os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    with loopback_cluster() if not address else contextlib.nullcontext(False):  # before Ray reads its settings
        try:
            import ray
        except ImportError:
            from noop_rt.runtime.errors import MissingDependencyError
            from noop_rt.runtime.extras import install_hint

            raise MissingDependencyError(f"--ray needs Ray Data: {install_hint('ray')}") from None
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from an offline cluster
        started_here = not ray.is_initialized()
        if started_here:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=os.cpu_count() or 2, log_to_driver=False, **LOCAL_INIT)
    cluster_s = time.perf_counter() - t0
    from noop_rt.jobs.parallel import plan

    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = show_progress
        workers = max(1, options.workers)
        actor_cpus = 1.0 if options.gpus_per_worker else actor_cpu_share(ray, workers)
        engine = plan(backend, "cuda" if options.gpus_per_worker else device, options.threads, options.concurrency,
                      ncores=max(1, int(actor_cpus)))
        if engine.threads is None:  # an actor's share of the cores, never the engine's all-cores default
            engine = dataclasses.replace(engine, threads=max(1, int(actor_cpus)))
        block = ray_block_size(options, len(todo))
        ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=-(-len(todo) // block))
        ds = ds.map_batches(
            _RayClassifier, batch_size=block, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=actor_cpus,
            num_gpus=options.gpus_per_worker or None, zero_copy_batch=True,
            fn_constructor_kwargs={"load": load, "top_k": options.top_k, "ident": ident,
                                   "batch_size": options.batch_size, "engine": engine.to_json()})
        start = time.perf_counter()
        first_s, done = None, 0
        per_pid: dict[int, dict[str, float]] = {}
        blocks: list[tuple[int, float, float, int]] = []  # (pid, start, end, images) of each actor call
        for n, batch in enumerate(ds.iter_batches(batch_size=None, batch_format="numpy")):
            if options.fail_after_batches is not None and n >= options.fail_after_batches:
                raise RuntimeError(f"simulated crash after {n} batches")
            write_part(parts, next_part + n, [json.loads(r) for r in batch["row"]])
            done += len(batch["row"])
            if first_s is None:
                first_s = time.perf_counter() - start
            blocks += [(int(p), float(a), float(b), 1)
                       for p, a, b in zip(batch["pid"].tolist(), batch["t_start"].tolist(), batch["t_end"].tolist(),
                                          strict=True)]
            for pid, cpu, load_s in zip(batch["pid"].tolist(), batch["cpu_s"].tolist(), batch["load_s"].tolist(),
                                        strict=True):
                stats = per_pid.setdefault(int(pid), {"images": 0, "cpu_s": 0.0, "load_s": float(load_s)})
                stats["images"] += 1
                stats["cpu_s"] += float(cpu)
        return {"mode": "ray", "steady_images_per_s": steady_rate(blocks), "workers": workers, "rows_received": done,
                "actor_cpus": actor_cpus, "block_size": block,
                "plan_per_worker": engine.to_json(), "cluster_start_s": cluster_s if started_here else 0.0,
                "first_rows_s": first_s,
                "workers_seen": {str(pid): {"images": int(v["images"]), "model_load_s": v["load_s"],
                                            "cpu_ms_per_image": 1e3 * v["cpu_s"] / max(v["images"], 1)}
                                 for pid, v in per_pid.items()}}
    finally:
        if started_here:
            ray.shutdown()
