"""Classification calls in flight at once, sized to the cores: the engine plan of `batch` and `eval` in process.

One engine call at a time leaves cores idle: a small UNet batch does not keep every core of its thread pool busy,
and while Python decodes, scores or writes, the engine waits. `k` calls in flight with the threads split between
them keep them busy. Per engine, what measured best (benchmarks/results/batch_scaling.md):

- onnxruntime: one session, `k = cores` calls at once through it, one engine thread each, not spinning
  (`InferenceSession.run` is thread-safe);
- OpenVINO: `k = cores` classifiers (an inference request serves one call at a time), one engine thread each;
- the GPU engines (TensorRT, torch, onnxruntime on CUDA): one call at a time, the engine's own threads.

`--threads` / `--concurrency` override either number. Decoding runs in its own thread ahead of the engine calls, and
the results come back in input order."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from noop_rt.runtime.errors import BadInputError

if TYPE_CHECKING:
    from noop_rt.api import LoadOptions

T = TypeVar("T")
R = TypeVar("R")
D = TypeVar("D")

# engine -> (sessions shared by the calls in flight?, engine threads per call); calls in flight default to the cores
CPU_ENGINES = {"onnxruntime": True, "openvino": False}


@dataclass(frozen=True)
class EnginePlan:
    """How many classification calls run at once, on how many engine threads each, through how many classifiers."""

    concurrency: int  # calls in flight
    threads: int | None  # engine threads per call (None: the engine's own default)
    sessions: int  # classifiers opened (1: the calls share one; else one per call)
    why: str  # "measured default for ENGINE", "--threads/--concurrency", ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


def plan(backend: str, device: str, threads: int | None = None, concurrency: int | None = None,
         ncores: int | None = None) -> EnginePlan:
    """The engine plan for `backend` on `device` (the classifier's, as opened): the measured default, with
    `threads` / `concurrency` (the user's) taking precedence."""
    if threads is not None and threads < 1:
        raise BadInputError(f"--threads must be at least 1, got {threads}")
    if concurrency is not None and concurrency < 1:
        raise BadInputError(f"--concurrency must be at least 1, got {concurrency}")
    n = ncores or cores()
    on_cpu = backend in CPU_ENGINES and not str(device).lower().startswith("cuda")
    said = [f for f, v in (("--threads", threads), ("--concurrency", concurrency)) if v is not None]
    if not on_cpu:  # GPU engines hold per-shape buffers or execution contexts: one call at a time
        k = concurrency or 1
        return EnginePlan(k, threads, k if k > 1 and backend != "onnxruntime" else 1,
                          " and ".join(said) if said else f"{backend} on {device}: one call at a time")
    k = concurrency or n
    per_call = threads or (None if k == 1 else max(1, n // k))  # one call at a time: the engine's own threads
    shared = CPU_ENGINES[backend]
    why = f"measured default for {backend} on {n} core(s)"
    if said:
        why = f"{' and '.join(said)} ({why} otherwise)"
    return EnginePlan(k, per_call, 1 if shared else k, why)


def open_classifiers(load: LoadOptions, first: Any, engine: EnginePlan) -> list[Any]:
    """`engine.sessions` classifiers for `load` with `engine.threads` threads each. `first` (opened with `load`) is
    kept when its threads already match, else replaced (closed). Every classifier shares `first`'s drift monitor and
    its warning stream, so the report covers every image."""
    from noop_rt.api import load as open_model

    want = load.updated(threads=engine.threads) if engine.threads != load.threads else load
    if want is not load:  # reopened with the plan's threads: it keeps the first's drift monitor and where it reports
        replaced = open_model(want)
        replaced.drift, replaced._drift_lock, replaced.on_drift = first.drift, first._drift_lock, first.on_drift
        first.close()
        first = replaced
    out = [first]
    try:
        for _ in range(engine.sessions - 1):
            clone = open_model(want)
            clone.drift, clone._drift_lock = first.drift, first._drift_lock  # one monitor, one lock
            clone.on_drift = first.on_drift
            out.append(clone)
    except BaseException:
        for c in out:
            c.close()
        raise
    return out


def ordered(items: Iterable[T], decode: Callable[[T], D], infer: Callable[[int, D], R], concurrency: int,
            ahead: int | None = None) -> Iterator[R]:
    """`infer(slot, decode(item))` for every item, `concurrency` infer calls at once (`slot` in 0..concurrency-1 says
    which classifier a call may use: no two running calls share a slot), decoding in a thread of its own ahead of
    them; results yielded in input order. At most `ahead` items (default 2 x concurrency) are in flight. Closing the
    generator (an error, Ctrl-C) cancels what has not started and waits for the running calls."""
    ahead = ahead or 2 * concurrency
    free: deque[int] = deque(range(concurrency))
    from threading import Lock

    lock = Lock()

    def work(decoded: Future[D]) -> R:
        value = decoded.result()
        with lock:
            slot = free.popleft()
        try:
            return infer(slot, value)
        finally:
            with lock:
                free.append(slot)

    pending: deque[Future[R]] = deque()
    decoder = ThreadPoolExecutor(1, thread_name_prefix="noop-rt-decode")
    engine = ThreadPoolExecutor(concurrency, thread_name_prefix="noop-rt-infer")
    try:
        for item in items:
            if len(pending) >= ahead:
                yield pending.popleft().result()
            pending.append(engine.submit(work, decoder.submit(decode, item)))
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        decoder.shutdown(wait=True, cancel_futures=True)
        engine.shutdown(wait=True, cancel_futures=True)
