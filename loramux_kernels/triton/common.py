"""Pieces shared by the Triton LoRA kernels: the slice table, the SGMV tile list, configs.

The weights the kernels read are the stacked per-slot buffers of loramux_kernels/buffers.py, one
`LoraModuleBuffers` per output slice of a projection (q, k, v of a fused qkv; gate, up of
a fused gate_up; a single slice elsewhere):

    lora_a  [max_slots, max_rank_k, in_features]   contiguous (row stride = in_features)
    lora_b  [max_slots, max_rank_k, out_k]         contiguous (row stride = out_k)
    ranks   int32 [max_slots]                       rank of each slot for this slice; 0 = none

Every kernel serves all slices of a projection in one launch, so the slices' buffers are
passed as one device table (`LoraSliceTable.meta`, int64 [num_slices, META_FIELDS]: base
pointers, strides and the slice's output columns), built once per projection and cached.
Stride requirements: the buffers contiguous (checked when the table is built); x and y
any strides (y may be a column view of a wider tensor). Fast path: when in_features and
every out_k are multiples of 16 and the buffers 16-byte aligned (fresh torch allocations
are), the kernels tell the compiler so and weight loads become 16-byte vector loads or
async copies; other sizes run with scalar loads, still correct.

The shrink result `h` handed from shrink to expand is fp32
    h  [num_splits, num_tokens, num_slices * max_rank]
slice k's rank-r columns are k * max_rank + [0, r); split p holds the partial product of
the p-th chunk of in_features (split-K), and expand sums the splits when it reads h, so no
atomics and no zero fill are needed. Columns past a slot's rank and rows of base (-1)
tokens are never written nor read.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton.language as tl

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import NO_ADAPTER, LoraBatchInfo

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Columns of LoraSliceTable.meta (one row per slice), read by the kernels. tl.constexpr:
# @triton.jit code may only read module globals that are constexpr.
META_A_PTR = tl.constexpr(0)  # lora_a.data_ptr()
META_A_SLOT_STRIDE = tl.constexpr(1)  # lora_a.stride(0) = max_rank_k * in_features
META_B_PTR = tl.constexpr(2)  # lora_b.data_ptr()
META_B_SLOT_STRIDE = tl.constexpr(3)  # lora_b.stride(0) = max_rank_k * out_k
META_B_ROW_STRIDE = tl.constexpr(4)  # lora_b.stride(1) = out_k
META_RANKS_PTR = tl.constexpr(5)  # ranks.data_ptr() (int32)
META_OUT_OFFSET = tl.constexpr(6)  # first column of the slice in y: sum of the previous slices' out_k
META_OUT_WIDTH = tl.constexpr(7)  # out_k
META_FIELDS = tl.constexpr(8)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class LoraSliceTable:
    """The output slices of one projection as the kernels see them (built once, cached)."""

    buffers: tuple[LoraModuleBuffers, ...]  # kept alive: `meta` holds raw pointers into them
    meta: torch.Tensor  # int64 [num_slices, META_FIELDS], on the buffers' device
    in_features: int
    max_rank: int  # h columns per slice: the largest max_rank of the slices
    out_features: tuple[int, ...]  # out_k per slice
    out_offsets: tuple[int, ...]  # first y column per slice
    dtype: torch.dtype
    device: torch.device
    # Every weight base pointer 16-byte aligned and every stride and column offset a
    # multiple of 16 elements (in_features and all out_k divisible by 16): the kernels then
    # tell the compiler so (tl.multiple_of), which it cannot see through loaded pointers,
    # and weight loads become 16-byte vector loads. False for odd sizes: scalar, correct.
    aligned: bool

    @property
    def num_slices(self) -> int:
        return len(self.buffers)

    @property
    def total_out(self) -> int:
        return sum(self.out_features)

    @property
    def max_out(self) -> int:
        return max(self.out_features)

    @classmethod
    def build(cls, slices: Sequence[LoraModuleBuffers]) -> LoraSliceTable:
        """Check that the slices can share one launch and pack their pointers and strides.

        The buffers' tensors are allocated once and written in place by the adapter store,
        so the table stays valid for their lifetime; ranks are read on the device per call.
        """
        if not slices:
            raise ValueError("a projection needs at least one LoRA slice")
        first = slices[0]
        rows, offsets, offset = [], [], 0
        for buffers in slices:
            a, b, ranks = buffers.lora_a, buffers.lora_b, buffers.ranks
            if a.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"LoRA buffers of dtype {a.dtype} are not supported (fp32, fp16, bf16)")
            if (
                a.dtype != first.lora_a.dtype
                or b.dtype != a.dtype
                or a.device != first.lora_a.device
                or b.device != a.device
                or ranks.device != a.device
            ):
                raise ValueError("all LoRA slices of a projection must share one dtype and device")
            if buffers.in_features != first.in_features or buffers.max_slots != first.max_slots:
                raise ValueError("all LoRA slices of a projection must share in_features and max_slots")
            if not (a.is_contiguous() and b.is_contiguous() and ranks.is_contiguous()):
                raise ValueError("LoRA buffers must be contiguous (see loramux_kernels/buffers.py)")
            if ranks.dtype != torch.int32:
                raise ValueError("LoRA ranks must be int32")
            row = [0] * META_FIELDS.value
            row[META_A_PTR.value] = a.data_ptr()
            row[META_A_SLOT_STRIDE.value] = a.stride(0)
            row[META_B_PTR.value] = b.data_ptr()
            row[META_B_SLOT_STRIDE.value] = b.stride(0)
            row[META_B_ROW_STRIDE.value] = b.stride(1)
            row[META_RANKS_PTR.value] = ranks.data_ptr()
            row[META_OUT_OFFSET.value] = offset
            row[META_OUT_WIDTH.value] = buffers.out_features
            rows.append(row)
            offsets.append(offset)
            offset += buffers.out_features
        meta = torch.tensor(rows, dtype=torch.int64).to(first.lora_a.device)
        aligned = first.in_features % 16 == 0 and all(
            b.out_features % 16 == 0 and b.lora_a.data_ptr() % 16 == 0 and b.lora_b.data_ptr() % 16 == 0
            for b in slices
        )
        return cls(
            buffers=tuple(slices),
            meta=meta,
            in_features=first.in_features,
            max_rank=max(b.max_rank for b in slices),
            out_features=tuple(b.out_features for b in slices),
            out_offsets=tuple(offsets),
            dtype=first.lora_a.dtype,
            device=first.lora_a.device,
            aligned=aligned,
        )


def sgmv_block_m(max_seg_len: int) -> int:
    """Rows per SGMV tile: the smallest of 16/32/64 that holds the longest segment
    (tl.dot needs at least 16), 64 for long segments."""
    if max_seg_len <= 16:
        return 16
    if max_seg_len <= 32:
        return 32
    return 64


@dataclass(frozen=True)
class SgmvTiles:
    """The SGMV work list of one step: one tile per BLOCK_M rows of each adapted segment.

    Segments with slot -1 or no rows get no tile, so base tokens cost no program at all,
    and a long prefill beside short decodes launches no empty programs.
    """

    block_m: int
    num_tiles: int
    # int32 [2, num_tiles]: row 0 = segment index of each tile, row 1 = its first row
    tiles: torch.Tensor

    @classmethod
    def build(cls, info: LoraBatchInfo, block_m: int | None = None) -> SgmvTiles:
        """From the host copies of the metadata (no device read); one small H2D copy."""
        if block_m is None:
            block_m = sgmv_block_m(info.max_seg_len)
        if block_m < 16 or block_m & (block_m - 1):
            raise ValueError(f"block_m={block_m} must be a power of two >= 16 (tl.dot)")
        segs: list[int] = []
        starts: list[int] = []
        indptr = info.seg_indptr_host
        for i, slot in enumerate(info.slot_indices_host):
            if slot == NO_ADAPTER:
                continue
            for row in range(indptr[i], indptr[i + 1], block_m):
                segs.append(i)
                starts.append(row)
        host = torch.tensor([segs, starts], dtype=torch.int32)
        device = info.seg_indptr.device
        if device.type == "cuda":  # async copy; the caching host allocator keeps it alive
            tiles = host.pin_memory().to(device, non_blocking=True)
        else:
            tiles = host.to(device)
        return cls(block_m=block_m, num_tiles=len(segs), tiles=tiles)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters of one kernel (the knobs an autotuner would sweep).

    block_n: output columns per program (shrink: rank columns; expand: y columns)
    block_k: reduction chunk (shrink: in_features; expand: rank)
    split_k: shrink only, number of in_features chunks reduced by separate programs
    """

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


def check_config(config: KernelConfig, uses_dot: bool) -> None:
    """Block sizes are powers of two (tl.arange), at least 16 where tl.dot uses them."""
    least = 16 if uses_dot else 1
    for name in ("block_n", "block_k"):
        value = getattr(config, name)
        if value < least or value & (value - 1):
            raise ValueError(f"{name}={value}: block sizes must be powers of two >= {least}")
    if config.split_k < 1:
        raise ValueError(f"split_k={config.split_k} must be >= 1")


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(num_programs: int, in_features: int, block_k: int, device: torch.device) -> int:
    """Split the in_features reduction of a shrink when the launch would not fill the GPU:
    aim for two programs per SM, each split keeping at least 4 BLOCK_K steps."""
    target = 2 * num_sms(device)
    if num_programs <= 0 or num_programs >= target:
        return 1
    max_split = max(1, in_features // (4 * block_k))
    return max(1, min(max_split, cdiv(target, num_programs), 16))


def split_len(in_features: int, split_k: int, block_k: int) -> int:
    """in_features elements per split, a multiple of block_k."""
    return cdiv(cdiv(in_features, split_k), block_k) * block_k


def check_rows(t: torch.Tensor, name: str, table: LoraSliceTable, num_tokens: int, width: int) -> None:
    """A [num_tokens, width] activation of the table's dtype on its device (any strides)."""
    if t.dim() != 2 or t.shape[0] != num_tokens or t.shape[1] != width:
        raise ValueError(f"{name} must be [{num_tokens}, {width}], got {list(t.shape)}")
    if t.dtype != table.dtype:
        raise ValueError(f"{name} is {t.dtype} but the LoRA buffers are {table.dtype}")
    if t.device != table.device:
        raise ValueError(f"{name} is on {t.device} but the LoRA buffers are on {table.device}")


def check_h(h: torch.Tensor, table: LoraSliceTable, num_tokens: int) -> None:
    """The shrink result: fp32 [num_splits, num_tokens, num_slices * max_rank]."""
    cols = table.num_slices * table.max_rank
    if h.dim() != 3 or h.shape[0] < 1 or h.shape[1] != num_tokens or h.shape[2] != cols:
        raise ValueError(f"h must be [num_splits, {num_tokens}, {cols}], got {list(h.shape)}")
    if h.dtype != torch.float32:
        raise ValueError(f"h must be float32, got {h.dtype}")
    if h.device != table.device:
        raise ValueError(f"h is on {h.device} but the LoRA buffers are on {table.device}")


def check_index(t: torch.Tensor, name: str, length: int, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 1 or t.shape[0] != length or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} [{length}] on {device}, got {t.dtype} {list(t.shape)} on {t.device}")
    if t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous")


def dot_in_fp32(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the shrink's tl.dot runs on fp32 operands.

    fp32: always (input_precision="ieee", so no TF32 rounding). bf16 off CUDA: the Triton
    interpreter keeps bf16 as raw uint16 and its tl.dot would multiply the bit patterns,
    so it gets fp32 operands there; on a GPU bf16 runs on tensor cores like fp16.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and device.type != "cuda")


def expand_dot_precision(dtype: torch.dtype) -> str:
    """Expand multiplies fp32 h by B upcast to fp32: exact for fp32 serving; TF32 (10-bit
    mantissa, above bf16's 7 and equal to fp16's) for fp16/bf16 serving."""
    return "ieee" if dtype == torch.float32 else "tf32"
