"""The CPU LoRA backend: a fused C kernel for short segments, torch matmuls for long ones.

Decode steps (a few tokens per adapter) go through `lora_sgmv_f32` in kernels/cpu/sgmv.c:
one call per projection slice, each adapter's weights streamed once. Long segments
(prefill) go through torch, whose BLAS is at its best on tall matmuls.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.buffers import LoraModuleBuffers
from kernels.cpu_build import KernelBuildError, load_kernel_library
from kernels.metadata import NO_ADAPTER, LoraBatchInfo
from kernels.torch_backend import TorchLoraBackend, add_lora_segments

logger = logging.getLogger(__name__)

# Segments with at least this many tokens go to torch (BLAS beats the fused kernel there).
LONG_SEGMENT_TOKENS = 16

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I = ctypes.c_int


@dataclass(frozen=True)
class _SegmentPlan:
    """How one step's segments split between the two paths (computed once per step)."""

    long_segments: tuple[int, ...]
    num_short: int
    short_start: torch.Tensor  # int32 [num_short]
    short_end: torch.Tensor  # int32 [num_short]
    short_slot: torch.Tensor  # int32 [num_short]
    short_scale: torch.Tensor  # float32 [num_short]


def _plan_segments(info: LoraBatchInfo) -> _SegmentPlan:
    long_segments, short = [], []
    indptr = info.seg_indptr_host
    for i, slot in enumerate(info.slot_indices_host):
        length = indptr[i + 1] - indptr[i]
        if slot == NO_ADAPTER or length == 0:
            continue
        (long_segments if length >= LONG_SEGMENT_TOKENS else short).append(i)
    return _SegmentPlan(
        long_segments=tuple(long_segments),
        num_short=len(short),
        short_start=torch.tensor([indptr[i] for i in short], dtype=torch.int32),
        short_end=torch.tensor([indptr[i + 1] for i in short], dtype=torch.int32),
        short_slot=torch.tensor([info.slot_indices_host[i] for i in short], dtype=torch.int32),
        short_scale=torch.tensor([info.seg_scales_host[i] for i in short], dtype=torch.float32),
    )


class CpuLoraBackend:
    name = "cpu"

    def __init__(self, library: ctypes.CDLL, num_threads: int | None = None) -> None:
        self._kernel = library.lora_sgmv_f32
        self._kernel.restype = None
        self._kernel.argtypes = [_P, _I64, _P, _I64, _I, _I, _P, _P, _I, _P, _P, _P, _P, _P, _I, _I]
        self._num_threads = num_threads
        self._planned_info: LoraBatchInfo | None = None
        self._plan: _SegmentPlan | None = None

    @classmethod
    def create(cls, dtype: torch.dtype, cache_dir: Path | None = None):
        """The fused kernel serves fp32; other dtypes, or a machine with no C compiler, get
        the torch backend (correct, slower at decode)."""
        if dtype != torch.float32:
            return TorchLoraBackend()
        try:
            return cls(load_kernel_library("sgmv", cache_dir))
        except KernelBuildError as exc:
            logger.warning("CPU LoRA kernel unavailable, using the torch backend: %s", exc)
            return TorchLoraBackend()

    def _segment_plan(self, info: LoraBatchInfo) -> _SegmentPlan:
        if info is not self._planned_info:  # one plan per step, reused by every layer
            self._plan = _plan_segments(info)
            self._planned_info = info
        assert self._plan is not None
        return self._plan

    def add_lora(
        self,
        y: torch.Tensor,  # [num_tokens, sum of slice widths] fp32, rows contiguous
        x: torch.Tensor,  # [num_tokens, in_features] fp32, rows contiguous
        slices: Sequence[LoraModuleBuffers],
        info: LoraBatchInfo,
    ) -> None:
        plan = self._segment_plan(info)
        if plan.long_segments:
            add_lora_segments(y, x, slices, info, plan.long_segments)
        if not plan.num_short:
            return
        if y.dtype != torch.float32 or x.dtype != torch.float32 or y.stride(1) != 1 or x.stride(1) != 1:
            raise ValueError("the CPU LoRA kernel needs fp32 tensors with contiguous rows")
        threads = self._num_threads or torch.get_num_threads()
        offset = 0
        for buffers in slices:
            self._kernel(
                y.data_ptr() + offset * y.element_size(),
                y.stride(0),
                x.data_ptr(),
                x.stride(0),
                buffers.in_features,
                buffers.out_features,
                buffers.lora_a.data_ptr(),
                buffers.lora_b.data_ptr(),
                buffers.max_rank,
                buffers.ranks.data_ptr(),
                plan.short_start.data_ptr(),
                plan.short_end.data_ptr(),
                plan.short_slot.data_ptr(),
                plan.short_scale.data_ptr(),
                plan.num_short,
                threads,
            )
            offset += buffers.out_features
