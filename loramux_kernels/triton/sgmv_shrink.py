"""SGMV shrink: the LoRA A product of every segment of tokens that share an adapter.

Semantics: h[s[i]:s[i+1], k*R : k*R + r] = x[s[i]:s[i+1]] @ A_k[w[i], :r].T
    for each segment i with slot w = w[i] != -1 and each slice k, r = ranks_k[w], R = max
    rank of the table; h is returned as split-K partials (sum over its first dimension).

Reads (see loramux_kernels/triton/common.py for the table):
    x       [num_tokens, in_features]                     any strides
    A_k     lora_a [max_slots, max_rank_k, in_features]   contiguous, one per slice
    ranks_k int32 [max_slots]
Writes:
    h       fp32 [split_k, num_tokens, num_slices * R]    contiguous, fresh each call

Grid: (num_tiles, num_slices * split_k, cdiv(R, BLOCK_N)). A tile is BLOCK_M rows of one
adapted segment (SgmvTiles); rank blocks at or past the slot's rank exit at once, so an
adapter of rank 8 in a launch with rank-64 adapters costs rank 8 (no padding to the max).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels.metadata import LoraBatchInfo
from loramux.kernels.triton.common import (
    META_A_PTR,
    META_A_SLOT_STRIDE,
    META_FIELDS,
    META_RANKS_PTR,
    KernelConfig,
    LoraSliceTable,
    SgmvTiles,
    check_config,
    check_index,
    check_rows,
    choose_split_k,
    dot_in_fp32,
    next_power_of_2,
    split_len,
)


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr,  # [num_tokens, in_features]
    h_ptr,  # fp32 [split_k, num_tokens, num_slices * MAX_RANK]
    meta_ptr,  # int64 [num_slices, META_FIELDS]
    tiles_ptr,  # int32 [2, num_tiles]: segment, first row
    seg_indptr_ptr,  # int32 [num_segments + 1]
    slot_indices_ptr,  # int32 [num_segments]
    num_tiles,
    in_features,  # also lora_a's row stride (contiguous buffers)
    k_per_split,  # in_features elements per split, a multiple of BLOCK_K
    stride_xm,
    stride_xk,
    stride_hs,
    stride_hm,
    MAX_RANK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    WEIGHTS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    slice_id = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    seg = tl.load(tiles_ptr + tile)
    slot = tl.load(slot_indices_ptr + seg)
    if slot < 0:  # base tokens: no adapter, no work (tiles normally skip them already)
        return
    meta = meta_ptr + slice_id * META_FIELDS
    ranks_ptr = tl.load(meta + META_RANKS_PTR).to(tl.pointer_type(tl.int32))
    rank = tl.load(ranks_ptr + slot)
    n_start = tl.program_id(2) * BLOCK_N
    if n_start >= rank:  # past this adapter's rank (rank 0: the slot does not adapt it)
        return
    a_ptr = tl.load(meta + META_A_PTR).to(tl.pointer_type(x_ptr.dtype.element_ty))
    a_slot_stride = tl.load(meta + META_A_SLOT_STRIDE)
    if WEIGHTS_ALIGNED:  # lets the compiler vectorize the weight loads (see LoraSliceTable)
        a_ptr = tl.multiple_of(a_ptr, 16)
        a_slot_stride = tl.multiple_of(a_slot_stride, 16)

    row_start = tl.load(tiles_ptr + num_tiles + tile)
    seg_end = tl.load(seg_indptr_ptr + seg + 1)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < seg_end
    mask_n = offs_n < rank
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)

    # x tile [BLOCK_M, BLOCK_K]; A tile [BLOCK_K, BLOCK_N] read as A[slot, n, k] (k contiguous)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_start + offs_k)[None, :] * stride_xk
    a_ptrs = a_ptr + slot.to(tl.int64) * a_slot_stride + offs_n[None, :] * in_features + (k_start + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = (k + offs_k) < k_end
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_IN_FP32:
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
        else:  # fp16 / bf16 tensor cores, fp32 accumulation
            acc += tl.dot(x, a)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K

    # Every split stores its partial (zeros when its chunk is empty): expand sums them all.
    h_cols = slice_id * MAX_RANK + offs_n
    h_ptrs = h_ptr + split * stride_hs + offs_m[:, None].to(tl.int64) * stride_hm + h_cols[None, :]
    tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


def default_config(table: LoraSliceTable, tiles: SgmvTiles) -> KernelConfig:
    """Heuristic launch parameters (untuned on hardware; see bench/bench_kernels_cuda.py)."""
    block_n = min(max(next_power_of_2(table.max_rank), 16), 64)
    block_k = 128 if block_n <= 32 and tiles.block_m <= 32 else 64
    programs = tiles.num_tiles * table.num_slices * -(-table.max_rank // block_n)
    split_k = choose_split_k(programs, table.in_features, block_k, table.device)
    return KernelConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=3)


def sgmv_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    table: LoraSliceTable,
    info: LoraBatchInfo,
    tiles: SgmvTiles | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:  # fp32 [split_k, num_tokens, num_slices * max_rank]
    """Semantics: h[s[i]:s[i+1], k*R : k*R+r] = x[s[i]:s[i+1]] @ A_k[w[i], :r].T, r = ranks_k[w[i]]
    (h summed over its split dimension; segments with w[i] = -1 are left unwritten).

    `tiles` is the step's SgmvTiles (built from `info` when omitted); `config` overrides the
    heuristic block sizes and split-K.
    """
    check_rows(x, "x", table, info.num_tokens, table.in_features)
    check_index(info.seg_indptr, "seg_indptr", info.num_segments + 1, torch.int32, table.device)
    check_index(info.slot_indices, "slot_indices", info.num_segments, torch.int32, table.device)
    if tiles is None:
        tiles = SgmvTiles.build(info)
    if config is None:
        config = default_config(table, tiles)
    check_config(config, uses_dot=True)
    split_k = config.split_k
    h = torch.empty(split_k, info.num_tokens, table.num_slices * table.max_rank, dtype=torch.float32, device=x.device)
    if tiles.num_tiles == 0 or table.max_rank == 0:
        return h
    grid = (tiles.num_tiles, table.num_slices * split_k, triton.cdiv(table.max_rank, config.block_n))
    _sgmv_shrink_kernel[grid](
        x,
        h,
        table.meta,
        tiles.tiles,
        info.seg_indptr,
        info.slot_indices,
        tiles.num_tiles,
        table.in_features,
        split_len(table.in_features, split_k, config.block_k),
        x.stride(0),
        x.stride(1),
        h.stride(0),
        h.stride(1),
        MAX_RANK=table.max_rank,
        SPLIT_K=split_k,
        DOT_IN_FP32=dot_in_fp32(x.dtype, x.device),
        WEIGHTS_ALIGNED=table.aligned,
        BLOCK_M=tiles.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return h
