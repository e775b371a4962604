"""SGMV expand: add every segment's LoRA B product to its output slices, one launch.

Semantics: y[s[i]:s[i+1], off_k : off_k + n_k] += scale[i] * h[s[i]:s[i+1], k*R : k*R + r] @ B_k[w[i], :r]
    for each segment i with slot w = w[i] != -1 and each slice k, r = ranks_k[w]
    (h = the sum of sgmv_shrink's split-K partials).

Reads (see loramux_kernels/triton/common.py for the table):
    h       fp32 [num_splits, num_tokens, num_slices * R]    from the shrink, contiguous
    B_k     lora_b [max_slots, max_rank_k, out_k]            contiguous, one per slice
    ranks_k int32 [max_slots]; scale = info.seg_scales float32 [num_segments]
Updates:
    y       [num_tokens, sum_k out_k]                         any strides (a column view too)

Grid: (num_tiles, cdiv(max_k out_k, BLOCK_N), num_slices). The reduction runs over the
slot's own rank only (BLOCK_K rows at a time), so mixed ranks share a launch unpadded;
column blocks past a narrower slice (GQA k/v beside q) exit at once. Every element of y
belongs to exactly one program: a plain read-modify-write, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels.metadata import LoraBatchInfo
from loramux.kernels.triton.common import (
    META_B_PTR,
    META_B_ROW_STRIDE,
    META_B_SLOT_STRIDE,
    META_FIELDS,
    META_OUT_OFFSET,
    META_OUT_WIDTH,
    META_RANKS_PTR,
    KernelConfig,
    LoraSliceTable,
    SgmvTiles,
    check_h,
    check_config,
    check_index,
    check_rows,
    expand_dot_precision,
)


@triton.jit
def _sgmv_expand_kernel(
    h_ptr,  # fp32 [num_splits, num_tokens, num_slices * MAX_RANK]
    y_ptr,  # [num_tokens, total_out]
    meta_ptr,  # int64 [num_slices, META_FIELDS]
    tiles_ptr,  # int32 [2, num_tiles]: segment, first row
    seg_indptr_ptr,  # int32 [num_segments + 1]
    slot_indices_ptr,  # int32 [num_segments]
    seg_scales_ptr,  # float32 [num_segments]
    num_tiles,
    num_splits,
    stride_hs,
    stride_hm,
    stride_ym,
    stride_yn,
    MAX_RANK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WEIGHTS_ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    slice_id = tl.program_id(2)
    seg = tl.load(tiles_ptr + tile)
    slot = tl.load(slot_indices_ptr + seg)
    if slot < 0:  # base tokens: no adapter, no work (tiles normally skip them already)
        return
    meta = meta_ptr + slice_id * META_FIELDS
    ranks_ptr = tl.load(meta + META_RANKS_PTR).to(tl.pointer_type(tl.int32))
    rank = tl.load(ranks_ptr + slot)
    if rank == 0:  # the slot does not adapt this slice
        return
    out_width = tl.load(meta + META_OUT_WIDTH)
    n_start = tl.program_id(1) * BLOCK_N
    if n_start >= out_width:  # past a narrower slice
        return
    b_ptr = tl.load(meta + META_B_PTR).to(tl.pointer_type(y_ptr.dtype.element_ty))
    b_slot_stride = tl.load(meta + META_B_SLOT_STRIDE)
    b_row_stride = tl.load(meta + META_B_ROW_STRIDE)
    out_offset = tl.load(meta + META_OUT_OFFSET)
    if WEIGHTS_ALIGNED:  # lets the compiler vectorize B loads and y accesses (see LoraSliceTable)
        b_ptr = tl.multiple_of(b_ptr, 16)
        b_slot_stride = tl.multiple_of(b_slot_stride, 16)
        b_row_stride = tl.multiple_of(b_row_stride, 16)
        out_offset = tl.multiple_of(out_offset, 16)
        out_width = tl.multiple_of(out_width, 16)  # column masks then hold per 16-wide group
    scale = tl.load(seg_scales_ptr + seg)

    row_start = tl.load(tiles_ptr + num_tiles + tile)
    seg_end = tl.load(seg_indptr_ptr + seg + 1)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < seg_end
    mask_n = offs_n < out_width

    # h tile [BLOCK_M, BLOCK_K] (this slice's columns); B tile [BLOCK_K, BLOCK_N] = B[slot, r, n]
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + (slice_id * MAX_RANK + offs_k)[None, :]
    b_ptrs = b_ptr + slot.to(tl.int64) * b_slot_stride + offs_k[:, None] * b_row_stride + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, rank, BLOCK_K):  # this adapter's rank only
        mask_k = (r + offs_k) < rank
        h_mask = mask_m[:, None] & mask_k[None, :]
        h = tl.load(h_ptrs, mask=h_mask, other=0.0)
        for split in range(1, num_splits):  # sum the shrink's split-K partials
            h += tl.load(h_ptrs + split * stride_hs, mask=h_mask, other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(h, b.to(tl.float32), input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * b_row_stride

    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + (out_offset + offs_n)[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=y_mask)


def default_config(table: LoraSliceTable, tiles: SgmvTiles) -> KernelConfig:
    """Heuristic launch parameters (untuned on hardware; see bench/bench_kernels_cuda.py).
    BLOCK_K = 16, tl.dot's minimum: the rank loop stops within 15 rows of each slot's rank."""
    block_n = 128 if tiles.block_m <= 32 else 64
    return KernelConfig(block_n=block_n, block_k=16, num_warps=4, num_stages=2)


def sgmv_expand(
    y: torch.Tensor,  # [num_tokens, total_out], updated in place
    h: torch.Tensor,  # fp32 [num_splits, num_tokens, num_slices * max_rank]
    table: LoraSliceTable,
    info: LoraBatchInfo,
    tiles: SgmvTiles | None = None,
    config: KernelConfig | None = None,
) -> None:
    """Semantics: y[s[i]:s[i+1], off_k:off_k+n_k] += scale[i] * h[s[i]:s[i+1], k*R:k*R+r] @ B_k[w[i], :r]
    with r = ranks_k[w[i]], scale = info.seg_scales, h summed over its split dimension.

    `tiles` must be the SgmvTiles the shrink used (built from `info` when omitted).
    """
    check_rows(y, "y", table, info.num_tokens, table.total_out)
    check_h(h, table, info.num_tokens)
    if h.stride(2) != 1:
        raise ValueError("h must have contiguous rows")
    check_index(info.seg_indptr, "seg_indptr", info.num_segments + 1, torch.int32, table.device)
    check_index(info.slot_indices, "slot_indices", info.num_segments, torch.int32, table.device)
    check_index(info.seg_scales, "seg_scales", info.num_segments, torch.float32, table.device)
    if tiles is None:
        tiles = SgmvTiles.build(info)
    if config is None:
        config = default_config(table, tiles)
    check_config(config, uses_dot=True)
    if tiles.num_tiles == 0 or table.max_rank == 0:
        return
    grid = (tiles.num_tiles, triton.cdiv(table.max_out, config.block_n), table.num_slices)
    _sgmv_expand_kernel[grid](
        h,
        y,
        table.meta,
        tiles.tiles,
        info.seg_indptr,
        info.slot_indices,
        info.seg_scales,
        tiles.num_tiles,
        h.shape[0],
        h.stride(0),
        h.stride(1),
        y.stride(0),
        y.stride(1),
        MAX_RANK=table.max_rank,
        DOT_PRECISION=expand_dot_precision(y.dtype),
        WEIGHTS_ALIGNED=table.aligned,
        BLOCK_M=tiles.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
