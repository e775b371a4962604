"""Native memory that would otherwise creep up under traffic of varying shapes.

- oneDNN (torch's bf16 GEMMs on CPU) caches a JIT-compiled primitive per GEMM shape, 1024
  by default; prefill steps of every token count add shapes, so that cache alone grows RSS
  by a hundred MB or more over a long run. `bound_onednn_cache` caps it (the decode shapes
  in use stay cached; a rare prefill shape is compiled again, about a millisecond).
- The C heap: torch frees its step tensors, but glibc keeps the freed pages (per-thread
  arenas, chunks below its dynamic mmap threshold), so RSS stays at a high-water mark
  that looks like a leak to an operator. `HeapTrimmer` calls glibc's `malloc_trim(0)`,
  which hands the free pages of every arena back; it walks the heap (a few ms), so it
  runs only on the engine thread when nothing is running, at most once per interval.
  Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time

logger = logging.getLogger(__name__)

TRIM_INTERVAL_S = 10.0
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = 256  # primitives (oneDNN's default: 1024)


def bound_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive cache unless the operator set it. oneDNN reads the variable
    when it creates its first primitive: call this before the model's first GEMM."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))


def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    def __init__(self, interval_s: float = TRIM_INTERVAL_S, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._trim = _malloc_trim()
        self._last = clock()
        self._dirty = False  # steps ran since the last trim
        self.num_trims = 0

    def stepped(self) -> None:
        self._dirty = True

    def idle(self) -> None:
        """The engine has nothing to run: trim if steps ran since the last trim and the
        interval has passed."""
        if self._trim is None or not self._dirty or self._clock() - self._last < self.interval_s:
            return
        started = time.perf_counter()
        self._trim(0)
        self._last, self._dirty = self._clock(), False
        self.num_trims += 1
        logger.debug("heap trimmed in %.1f ms", (time.perf_counter() - started) * 1e3)
