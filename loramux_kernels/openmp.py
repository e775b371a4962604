"""Per-thread OpenMP and MKL team sizes, without touching other threads' settings.

libgomp keeps one worker pool per thread that opens a parallel region. Once the process
has more pool threads than CPUs, libgomp stops spin-waiting everywhere ("throttled"
mode) and every parallel region pays for futex wake-ups: with hundreds of regions per
decode step that costs a quarter of the step on 2 cores. So only the engine's thread may
run wide regions; helper threads (the adapter loader) and the thread that loads the
model before handing it over run theirs with one thread.

Two settings decide a region's width: OpenMP's per-thread ICV (torch's own kernels and
ours) and MKL's thread count (torch's fp32 matmuls), which is process-wide unless the
thread sets a local one. torch.set_num_threads changes both for everyone, so it is not
used here.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

logger = logging.getLogger(__name__)
_setters: list | None = None


def _load() -> list:
    """The per-thread setters of the runtimes torch has loaded (already-loaded copies)."""
    global _setters
    if _setters is None:
        import torch

        _setters = []
        try:
            omp = ctypes.CDLL("libgomp.so.1").omp_set_num_threads  # by soname: torch's copy
            omp.argtypes, omp.restype = [ctypes.c_int], None
            _setters.append(omp)
        except (OSError, AttributeError):
            logger.debug("libgomp not found: OpenMP team sizes stay as they are")
        try:
            # torch links MKL statically into libtorch_cpu and exports its API. The C entry
            # point takes the count by value (the lower-case symbol is Fortran's, by pointer).
            library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
            mkl = library.MKL_Set_Num_Threads_Local
            mkl.argtypes, mkl.restype = [ctypes.c_int], ctypes.c_int
            _setters.append(mkl)
        except (OSError, AttributeError):
            logger.debug("MKL not found in torch: matmuls keep the process-wide thread count")
    return _setters


def set_thread_openmp_threads(num_threads: int) -> bool:
    """Set the calling thread's OpenMP and MKL team sizes; False where neither is found."""
    import torch

    setters = _load()
    # torch sets each thread's team size lazily, at its first parallel op, from its global
    # count; let it do so now so that it cannot overwrite ours later.
    torch.get_num_threads()
    for setter in setters:
        setter(max(1, int(num_threads)))
    return bool(setters)
