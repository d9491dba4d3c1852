"""CUDA graphs for the torch backend's NoOp pass: its shapes are static per batch (B images x C classes), so the
classifier module is captured once per input signature into a `torch.cuda.CUDAGraph` with static input and output
buffers, and a call copies its arguments into the static inputs and replays the graph (no per-kernel launch cost).

`CudaGraphed(module)` is that wrapper: at most `max_graphs` signatures are captured (each holds its own memory pool);
other signatures, CPU tensors, and a capture that fails run the module eagerly. It imports on the CPU; there the
capture itself cannot run, so the CPU tests drive the same cache and static-buffer protocol through `static_eager`
(a capture function that keeps the static buffers but reruns the module instead of a graph). `cuda_graph_capture`
is the thin CUDA part: NOT run here (no GPU on this project's machines); tests/test_gpu_paths.py runs it when a GPU
is there.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from noop_rt.runtime.backends.shape_cache import ShapeCache

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
# (module, static inputs) -> (the static outputs, replay: recompute the outputs in place from the static inputs)
Capture = Callable[[Callable[..., Outputs], list[torch.Tensor]], tuple[Outputs, Callable[[], None]]]
WARMUP_RUNS = 3  # eager runs on a side stream before capture (cuDNN/cuBLAS pick their algorithms and workspaces)


def as_tuple(out: Outputs) -> tuple[torch.Tensor, ...]:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def cuda_graph_capture(module: Callable[..., Outputs], static_inputs: list[torch.Tensor]) \
        -> tuple[Outputs, Callable[[], None]]:  # pragma: no cover - CUDA only, not run here
    """Warm up on a side stream, then capture one call of `module` on `static_inputs` into a CUDA graph."""
    device = static_inputs[0].device
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            module(*static_inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = module(*static_inputs)
    return outputs, graph.replay


def static_eager(module: Callable[..., Outputs], static_inputs: list[torch.Tensor]) \
        -> tuple[Outputs, Callable[[], None]]:
    """The static-buffer protocol without a graph: replay reruns `module` on the static inputs and copies the
    result into the static outputs. Runs on any device (the CPU tests, debugging a capture); slower than eager."""
    outputs = module(*static_inputs)

    def replay() -> None:
        for static, new in zip(as_tuple(outputs), as_tuple(module(*static_inputs)), strict=True):
            static.copy_(new)

    return outputs, replay


@dataclass
class Captured:
    """One captured signature: the static inputs a call copies into, the static outputs the replay writes."""

    inputs: list[torch.Tensor]
    outputs: tuple[torch.Tensor, ...]
    replay: Callable[[], None]
    single: bool  # the module returns one tensor, not a tuple


class CudaGraphed:
    """`module` replayed from a CUDA graph per input signature (shapes, dtypes, device), eager otherwise."""

    def __init__(self, module: Callable[..., Outputs], *, enabled: bool = True, max_graphs: int = 2,
                 capture: Capture | None = None) -> None:
        self.module = module
        self.enabled = enabled
        self.capture: Capture = capture or cuda_graph_capture
        self.graphs: ShapeCache[Captured] = ShapeCache(max_graphs, evict=False)
        self.replays = 0
        self.eager_calls = 0
        self._warned = False
        self.lock = threading.Lock()

    @staticmethod
    def key(args: tuple[Any, ...]) -> tuple[tuple[tuple[int, ...], str, str], ...]:
        return tuple((tuple(int(d) for d in a.shape), str(a.dtype), str(a.device)) for a in args)

    def capturable(self, args: tuple[Any, ...]) -> bool:
        """Tensors only; with the CUDA capture, CUDA tensors only (a custom capture runs on any device)."""
        if not self.enabled or not args or not all(isinstance(a, torch.Tensor) for a in args):
            return False
        if self.capture is cuda_graph_capture:
            return all(a.is_cuda for a in args) and torch.cuda.is_available()
        return True

    def __call__(self, *args: Any) -> Outputs:
        if self.capturable(args):
            key = self.key(args)
            with self.lock:
                entry = self.graphs.get(key, lambda: self._capture(args))
            if entry is not None:
                with self.lock:  # one call at a time on the static buffers
                    for static, arg in zip(entry.inputs, args, strict=True):
                        static.copy_(arg)
                    entry.replay()
                    self.replays += 1
                    outputs = tuple(o.clone() for o in entry.outputs)  # the next replay overwrites the static ones
                return outputs[0] if entry.single else outputs
            if key in self.graphs.failures and not self._warned:
                self._warned = True
                logging.getLogger("noop_rt").warning("CUDA graph capture failed, running eagerly: %s",
                                                     self.graphs.failures[key])
        self.eager_calls += 1
        return self.module(*args)

    def _capture(self, args: tuple[torch.Tensor, ...]) -> Captured:
        static = [a.clone() for a in args]
        outputs, replay = self.capture(self.module, static)
        return Captured(static, as_tuple(outputs), replay, isinstance(outputs, torch.Tensor))

    def clear(self) -> None:
        self.graphs.clear()
