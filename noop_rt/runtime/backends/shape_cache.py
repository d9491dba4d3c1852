"""Per-shape caches for the GPU fast paths: IO bindings (onnxruntime) and CUDA graphs (torch, onnxruntime,
TensorRT) are made once per input signature (graph, shapes, dtypes) and reused while the shapes stay the same.

Pure Python, no engine: the policy is shared by every backend and unit-tested on the CPU.
- `evict=True` (bindings: cheap to remake): least recently used entries go once `limit` is reached.
- `evict=False` (CUDA graphs: each holds device memory, or a whole session): the first `limit` signatures are kept,
  later ones get None and the caller runs its plain path.
A signature whose build raised is remembered with the reason and not tried again (a failed capture is not retried on
every call).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

import numpy as np

T = TypeVar("T")


def signature(arrays: Mapping[str, Any]) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    """(name, shape, dtype) of every named array (numpy, torch or anything with .shape and .dtype), sorted by name:
    the part of a cache key that says which shapes a binding or a captured graph was made for."""
    return tuple((name, tuple(int(d) for d in a.shape), str(a.dtype))
                 for name, a in sorted(arrays.items()))


class ShapeCache(Generic[T]):
    """Entries by key, at most `limit` of them; see the module docstring for `evict` and failures."""

    def __init__(self, limit: int, *, evict: bool, close: Callable[[T], None] | None = None) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self.evict = evict
        self._close = close
        self.entries: OrderedDict[Hashable, T] = OrderedDict()
        self.failures: dict[Hashable, str] = {}  # key -> why building its entry failed
        self.built = 0  # entries built so far (evicted ones included)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def lookup(self, key: Hashable) -> T | None:
        """The entry for `key`, marked as just used, or None."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def has_room(self, key: Hashable) -> bool:
        """Whether `try_add(key, ...)` would build (not cached, never failed, and a slot free or freeable)."""
        if key in self.entries or key in self.failures or self.limit == 0:
            return False
        return self.evict or len(self.entries) < self.limit

    def try_add(self, key: Hashable, build: Callable[[], T]) -> T | None:
        """The cached entry for `key`, else a new one from `build()` when there is room; None when there is no room,
        or when `build` raised (the reason is kept in `failures[key]`)."""
        entry = self.lookup(key)
        if entry is not None:
            return entry
        if not self.has_room(key):
            return None
        try:
            entry = build()
        except Exception as exc:  # a capture or session that cannot be made: the caller falls back
            self.failures[key] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            return None
        while self.evict and len(self.entries) >= self.limit:
            _, old = self.entries.popitem(last=False)
            self._release(old)
        self.entries[key] = entry
        self.built += 1
        return entry

    def get(self, key: Hashable, build: Callable[[], T]) -> T | None:
        """`lookup`, else `try_add`."""
        entry = self.lookup(key)
        return entry if entry is not None else self.try_add(key, build)

    def _release(self, entry: T) -> None:
        if self._close is not None:
            self._close(entry)

    def clear(self) -> None:
        """Release every entry (and forget the failures)."""
        while self.entries:
            _, entry = self.entries.popitem(last=False)
            self._release(entry)
        self.failures.clear()


def host_array(values: np.ndarray, on_host_buffer: bool) -> np.ndarray:
    """An output read back from a bound buffer, safe to keep: a copy when `values` is a view of a host buffer that
    the next call overwrites (onnxruntime's CPU OrtValue.numpy()); as it is when it already is a fresh host copy."""
    return np.array(values, copy=True) if on_host_buffer else values
