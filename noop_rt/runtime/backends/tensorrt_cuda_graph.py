"""CUDA graphs for the TensorRT runner's static NoOp profile, through the CUDA runtime that Polygraphy loads.

A graph holds the device addresses it was captured with, so `GraphCache` drops every graph when a buffer moves (grew);
that policy is pure and unit-tested, the CUDA calls (`_CudaGraph`) are thin and NOT run here (no GPU).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from noop_rt.runtime.backends.shape_cache import ShapeCache
from noop_rt.runtime.errors import EngineError

MAX_CUDA_GRAPHS = 4  # captured shapes per engine
CAPTURE_MODE_THREAD_LOCAL = 1  # cudaStreamCaptureModeThreadLocal


# ----------------------------------------------------------------------------------------------- CUDA graphs
G = TypeVar("G")


def buffer_addresses(buffers: dict[str, Any]) -> tuple[tuple[str, int], ...]:
    """(tensor name, device address) of an engine's bound buffers, sorted: what a captured graph has baked in."""
    return tuple(sorted((name, int(buf.ptr)) for name, buf in buffers.items()))


class GraphCache(Generic[G]):
    """An engine's captured CUDA graphs by input signature, valid for one set of buffer addresses: when any buffer
    moved (it grew for a larger call), every graph captured on the old addresses is freed and forgotten."""

    def __init__(self, limit: int, free: Callable[[G], None]) -> None:
        self.cache: ShapeCache[G] = ShapeCache(limit, evict=False, close=free)
        self.addresses: tuple[tuple[str, int], ...] | None = None

    def lookup(self, key: Any, addresses: tuple[tuple[str, int], ...]) -> G | None:
        if addresses != self.addresses:
            self.cache.clear()
            self.addresses = addresses
        return self.cache.lookup(key)

    def try_add(self, key: Any, build: Callable[[], G]) -> G | None:
        """A graph for `key` on the addresses of the last `lookup`; None when full or the capture failed."""
        return self.cache.try_add(key, build)

    def failure(self, key: Any) -> str | None:
        return self.cache.failures.get(key)

    def clear(self) -> None:
        self.cache.clear()
        self.addresses = None


def _cudart() -> Any:  # pragma: no cover - needs the CUDA runtime: not run here
    from polygraphy import cuda

    return cuda.wrapper().handle


class _CudaGraph:  # pragma: no cover - needs TensorRT and a GPU: not run here
    """One `execute_async_v3` of an execution context, captured on `stream_ptr` and instantiated."""

    def __init__(self, context: Any, stream_ptr: int) -> None:
        cudart = _cudart()
        stream = ctypes.c_void_p(stream_ptr)
        self.graph, self.exec = ctypes.c_void_p(), ctypes.c_void_p()
        _cuda_check(cudart.cudaStreamBeginCapture(stream, ctypes.c_int(CAPTURE_MODE_THREAD_LOCAL)),
                    "cudaStreamBeginCapture")
        try:
            ok = context.execute_async_v3(stream_ptr)
        finally:  # always end the capture, or the stream stays unusable
            ended = cudart.cudaStreamEndCapture(stream, ctypes.byref(self.graph))
        if not ok:
            self.free()
            raise EngineError("TensorRT execution failed while capturing a CUDA graph")
        _cuda_check(ended, "cudaStreamEndCapture")
        rc = cudart.cudaGraphInstantiateWithFlags(ctypes.byref(self.exec), self.graph, ctypes.c_ulonglong(0))
        if rc != 0:
            self.free()
            _cuda_check(rc, "cudaGraphInstantiateWithFlags")

    def launch(self, stream_ptr: int) -> None:
        _cuda_check(_cudart().cudaGraphLaunch(self.exec, ctypes.c_void_p(stream_ptr)), "cudaGraphLaunch")

    def free(self) -> None:
        cudart = _cudart()
        if self.exec.value:
            cudart.cudaGraphExecDestroy(self.exec)
            self.exec = ctypes.c_void_p()
        if self.graph.value:
            cudart.cudaGraphDestroy(self.graph)
            self.graph = ctypes.c_void_p()


def _cuda_check(rc: int, call: str) -> None:
    if rc != 0:
        raise EngineError(f"CUDA runtime call {call} failed with error {rc}")


