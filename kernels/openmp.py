"""Per-thread OpenMP team size, without touching other threads or MKL's global setting.

libgomp keeps one worker pool per thread that opens a parallel region. Once the process
has more pool threads than CPUs, libgomp stops spin-waiting everywhere ("throttled"
mode) and every parallel region pays for futex wake-ups: with hundreds of regions per
decode step that costs a quarter of the step on 2 cores. So only the engine's thread may
run wide regions; helper threads (the adapter loader) and the thread that loads the
model before handing it over run theirs with one thread. torch.set_num_threads would also
change MKL's process-wide count, which the engine's matmuls use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)
_omp_set_num_threads = None


def _load() -> object:
    global _omp_set_num_threads
    if _omp_set_num_threads is None:
        import torch  # noqa: F401  (torch has loaded its OpenMP runtime; reuse that one)

        try:
            library = ctypes.CDLL("libgomp.so.1")  # the already-loaded copy, by soname
            _omp_set_num_threads = library.omp_set_num_threads
            _omp_set_num_threads.argtypes = [ctypes.c_int]
        except (OSError, AttributeError):
            _omp_set_num_threads = False
    return _omp_set_num_threads


def set_thread_openmp_threads(num_threads: int) -> bool:
    """Set the calling thread's OpenMP team size; False where the runtime is not libgomp."""
    import torch

    setter = _load()
    if not setter:
        logger.debug("libgomp not found: thread team sizes stay as they are")
        return False
    # torch sets each thread's team size lazily, at its first parallel op, from its global
    # count; let it do so now so that it cannot overwrite ours later.
    torch.get_num_threads()
    setter(max(1, int(num_threads)))
    return True
