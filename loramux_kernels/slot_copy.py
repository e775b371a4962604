"""Slot writes on the CPU with streaming stores (loramux_kernels/cpu/slot_copy.c).

A slot's memory is cold when a new adapter goes into it, and an ordinary store reads each
line before writing it; the C copy streams whole lines instead. Writing the default
model's r=16 adapter into a slot: fp32 ~40% faster, bf16 ~5x (torch's bf16 multiply by an
fp32 scale is slow). `copy_blocks` says False where it does not apply (CUDA, another dtype,
blocks that are not contiguous, no C compiler): the caller then uses torch, with the same
results (fp32 math, one rounding to the buffer's dtype).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from loramux.kernels.cpu_build import KernelBuildError, load_kernel_library

logger = logging.getLogger(__name__)

_ELEMENT_SIZES = {torch.float32: 4, torch.bfloat16: 2}


@functools.cache
def _kernel():
    try:
        kernel = load_kernel_library("slot_copy").slot_copy
    except KernelBuildError as exc:
        logger.warning("slot copies use torch (the C copy did not build): %s", exc)
        return None
    kernel.restype = ctypes.c_int
    kernel.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
    ]
    return kernel


def prepare(dtype: torch.dtype, device: torch.device | str) -> None:
    """Build / load the C copy now (the model's load), not in an adapter's first load."""
    if dtype in _ELEMENT_SIZES and torch.device(device).type == "cpu":
        _kernel()


def _blocks_contiguous(t: torch.Tensor) -> bool:
    return t.dim() == 3 and t.stride(2) == 1 and (t.shape[1] <= 1 or t.stride(1) == t.shape[2])


def copy_blocks(
    dst: torch.Tensor,  # [num_blocks, rows, cols], each block contiguous (a slot of each layer)
    src: torch.Tensor,  # [num_blocks, rows, cols], each block contiguous
    scales: torch.Tensor | None = None,  # fp32 [num_blocks]: dst[i] = src[i] * scales[i]
) -> bool:
    """dst[i] = src[i] (* scales[i]) for every i, on the CPU; False if not done (use torch)."""
    size = _ELEMENT_SIZES.get(dst.dtype)
    if (
        size is None
        or src.dtype != dst.dtype
        or dst.device.type != "cpu"
        or src.device.type != "cpu"
        or dst.shape != src.shape
        or not (_blocks_contiguous(dst) and _blocks_contiguous(src))
        or (scales is not None and (scales.dtype != torch.float32 or not scales.is_contiguous() or scales.numel() != dst.shape[0]))
    ):
        return False
    kernel = _kernel()
    if kernel is None:
        return False
    if dst.numel() == 0:
        return True
    done = kernel(
        dst.data_ptr(), dst.stride(0), src.data_ptr(), src.stride(0), dst.shape[1] * dst.shape[2],
        dst.shape[0], None if scales is None else scales.data_ptr(), size,
    )
    return done == 0
