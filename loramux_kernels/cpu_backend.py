"""The CPU LoRA backend: a fused C kernel for short segments, torch matmuls for long ones.

Decode steps (a few tokens per adapter) go through `lora_sgmv_f32` in loramux_kernels/cpu/sgmv.c
(fp32) or `lora_sgmv_bf16` in loramux_kernels/cpu/sgmv_bf16.c (bf16, fp32 accumulation; built
with AVX512-BF16 dot products where the CPU has them): one call per projection slice,
each adapter's weights streamed once. Long segments (prefill) go through torch, whose
BLAS (oneDNN with AMX tiles for bf16, where present) is at its best on tall matmuls.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.cpu_build import KernelBuildError, load_kernel_library
from loramux.kernels.metadata import NO_ADAPTER, LoraBatchInfo
from loramux.kernels.torch_backend import TorchLoraBackend, add_lora_segments

logger = logging.getLogger(__name__)

# Segments with at least this many tokens go to torch (BLAS beats the fused kernel there).
LONG_SEGMENT_TOKENS = 16
# In bf16, torch's small matmuls cost ~35 us each whatever their size, and the C kernel
# stays ahead up to ~32-48 rows (bench/bench_lora_bf16.py, one_segment).
LONG_SEGMENT_TOKENS_BY_DTYPE = {torch.float32: LONG_SEGMENT_TOKENS, torch.bfloat16: 48}
MAX_SLICES = 8  # SGMV_MAX_SLICES in loramux_kernels/cpu/sgmv_plan.h
# dtype -> (C source in loramux_kernels/cpu/, entry point); the kernels share one signature.
KERNELS = {torch.float32: ("sgmv", "lora_sgmv_f32"), torch.bfloat16: ("sgmv_bf16", "lora_sgmv_bf16")}

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


def _plan_segments(info: LoraBatchInfo, long_tokens: int = LONG_SEGMENT_TOKENS) -> _SegmentPlan:
    long_segments, short = [], []
    indptr = info.seg_indptr_host
    for i, slot in enumerate(info.slot_indices_host):
        length = indptr[i + 1] - indptr[i]
        if slot == NO_ADAPTER or length == 0:
            continue
        (long_segments if length >= long_tokens else short).append(i)
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

    def __init__(
        self, library: ctypes.CDLL, num_threads: int | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.dtype = dtype
        self._kernel = getattr(library, KERNELS[dtype][1])
        self.long_segment_tokens = LONG_SEGMENT_TOKENS_BY_DTYPE[dtype]  # from here on, torch
        self._kernel.restype = None
        self._kernel.argtypes = [_P, _I64, _P, _I64, _I, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P, _I, _I]
        self._num_threads = num_threads
        self._prepared: LoraBatchInfo | None = None  # the info `prepare` planned
        self._plan: _SegmentPlan | None = None
        self._slice_tables: dict[int, _SliceTable] = {}  # id(slices) -> pointer arrays

    @classmethod
    def create(cls, dtype: torch.dtype, cache_dir: Path | None = None):
        """The fused kernels serve fp32 and bf16; other dtypes, or a machine with no C
        compiler, get the torch backend (correct, slower at decode)."""
        if dtype not in KERNELS:
            return TorchLoraBackend()
        try:
            return cls(load_kernel_library(KERNELS[dtype][0], cache_dir), dtype=dtype)
        except KernelBuildError as exc:
            logger.warning("CPU LoRA kernel unavailable, using the torch backend: %s", exc)
            return TorchLoraBackend()

    def prepare(self, info: LoraBatchInfo) -> None:
        """Split the step's segments between the two paths (once per step)."""
        self._plan = _plan_segments(info, self.long_segment_tokens)
        self._prepared = info

    def add_lora(
        self,
        y: torch.Tensor,  # [num_tokens, sum of slice widths] self.dtype, rows contiguous
        x: torch.Tensor,  # [num_tokens, in_features] self.dtype, rows contiguous
        slices: Sequence[LoraModuleBuffers],
        info: LoraBatchInfo,
    ) -> None:
        plan = self._plan
        if plan is None or info is not self._prepared:
            raise RuntimeError("add_lora called with a LoraBatchInfo that prepare() did not plan")
        if plan.long_segments:
            add_lora_segments(y, x, slices, info, plan.long_segments)
        if not plan.num_short:
            return
        if y.dtype != self.dtype or x.dtype != self.dtype or y.stride(1) != 1 or x.stride(1) != 1:
            raise ValueError(f"the CPU LoRA kernel needs {self.dtype} tensors with contiguous rows")
        table = self._slice_table(slices)
        self._kernel(
            y.data_ptr(),
            y.stride(0),
            x.data_ptr(),
            x.stride(0),
            x.shape[1],
            table.a_ptrs.data_ptr(),
            table.b_ptrs.data_ptr(),
            table.rank_ptrs.data_ptr(),
            table.out_offsets.data_ptr(),
            table.out_widths.data_ptr(),
            len(slices),
            table.max_rank,
            plan.short_start.data_ptr(),
            plan.short_end.data_ptr(),
            plan.short_slot.data_ptr(),
            plan.short_scale.data_ptr(),
            plan.num_short,
            self._num_threads or torch.get_num_threads(),
        )

    def _slice_table(self, slices: Sequence[LoraModuleBuffers]) -> "_SliceTable":
        # The model passes the same slice tuples every step: build their pointer arrays once.
        table = self._slice_tables.get(id(slices))
        if table is None or table.slices is not slices:
            table = _SliceTable.build(slices, self.dtype)
            self._slice_tables[id(slices)] = table
        return table


@dataclass(frozen=True)
class _SliceTable:
    """Raw pointers and widths of a fused projection's slices, as the C kernel takes them."""

    slices: Sequence[LoraModuleBuffers]  # kept alive and compared by identity
    a_ptrs: torch.Tensor  # int64 [num_slices]
    b_ptrs: torch.Tensor  # int64 [num_slices]
    rank_ptrs: torch.Tensor  # int64 [num_slices]
    out_offsets: torch.Tensor  # int32 [num_slices]
    out_widths: torch.Tensor  # int32 [num_slices]
    max_rank: int

    @classmethod
    def build(cls, slices: Sequence[LoraModuleBuffers], dtype: torch.dtype) -> "_SliceTable":
        if len(slices) > MAX_SLICES:
            raise ValueError(f"the CPU kernel takes at most {MAX_SLICES} slices per call")
        if len({b.max_rank for b in slices}) != 1 or len({b.in_features for b in slices}) != 1:
            raise ValueError("fused slices must share max_rank and in_features")
        for b in slices:
            contiguous = b.lora_a.is_contiguous() and b.lora_b.is_contiguous()
            if b.lora_a.dtype != dtype or b.lora_b.dtype != dtype or not contiguous:
                raise ValueError(f"the CPU kernel needs contiguous {dtype} LoRA buffers")
        offsets, offset = [], 0
        for b in slices:
            offsets.append(offset)
            offset += b.out_features
        return cls(
            slices=slices,
            a_ptrs=torch.tensor([b.lora_a.data_ptr() for b in slices], dtype=torch.int64),
            b_ptrs=torch.tensor([b.lora_b.data_ptr() for b in slices], dtype=torch.int64),
            rank_ptrs=torch.tensor([b.ranks.data_ptr() for b in slices], dtype=torch.int64),
            out_offsets=torch.tensor(offsets, dtype=torch.int32),
            out_widths=torch.tensor([b.out_features for b in slices], dtype=torch.int32),
            max_rank=slices[0].max_rank,
        )
