"""BGMV expand: add each token's LoRA B product, with its own adapter, to its output slices.

Semantics: y[t, off_k : off_k + n_k] += scale[t] * h[t, k*R : k*R + r] @ B_k[w[t], :r]
    for each token t with slot w[t] = token_slots[t] != -1 and each slice k, r = ranks_k[w[t]]
    (h = the sum of bgmv_shrink's split-K partials; scale = 1 when token_scales is None).

Reads (see loramux_kernels/triton/common.py for the table):
    h             fp32 [num_splits, num_tokens, num_slices * R]   from the shrink, contiguous
    token_slots   int32 [num_tokens]; token_scales float32 [num_tokens] or None
    B_k           lora_b [max_slots, max_rank_k, out_k]           contiguous, one per slice
    ranks_k       int32 [max_slots]
Updates:
    y             [num_tokens, sum_k out_k]                        any strides (a column view too)

Grid: (num_tokens, cdiv(max_k out_k, BLOCK_N), num_slices). One token per program; the
reduction runs over the slot's own rank only, BLOCK_K rows at a time (mixed ranks unpadded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    check_h,
    check_config,
    check_index,
    check_rows,
)


@triton.jit
def _bgmv_expand_kernel(
    h_ptr,  # fp32 [num_splits, num_tokens, num_slices * MAX_RANK]
    y_ptr,  # [num_tokens, total_out]
    meta_ptr,  # int64 [num_slices, META_FIELDS]
    token_slots_ptr,  # int32 [num_tokens]
    token_scales_ptr,  # float32 [num_tokens] (unused unless HAS_SCALES)
    num_splits,
    stride_hs,
    stride_hm,
    stride_ym,
    stride_yn,
    MAX_RANK: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    WEIGHTS_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    slice_id = tl.program_id(2)
    slot = tl.load(token_slots_ptr + token)
    if slot < 0:  # base token: no adapter, no work
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

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < out_width

    # h chunk [BLOCK_K] (this slice's columns); B tile [BLOCK_K, BLOCK_N] = B[slot, r, n]
    h_ptrs = h_ptr + token.to(tl.int64) * stride_hm + slice_id * MAX_RANK + offs_k
    b_ptrs = b_ptr + slot.to(tl.int64) * b_slot_stride + offs_k[:, None] * b_row_stride + offs_n[None, :]
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced over the rank once, at the end
    for r in range(0, rank, BLOCK_K):  # this adapter's rank only
        mask_k = (r + offs_k) < rank
        h = tl.load(h_ptrs, mask=mask_k, other=0.0)
        for split in range(1, num_splits):  # sum the shrink's split-K partials
            h += tl.load(h_ptrs + split * stride_hs, mask=mask_k, other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        acc += h[:, None] * b
        h_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * b_row_stride
    delta = tl.sum(acc, axis=0)  # [BLOCK_N]
    if HAS_SCALES:
        delta *= tl.load(token_scales_ptr + token)

    y_ptrs = y_ptr + token.to(tl.int64) * stride_ym + (out_offset + offs_n) * stride_yn
    y = tl.load(y_ptrs, mask=mask_n, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask_n)


def default_config(table: LoraSliceTable, num_tokens: int) -> KernelConfig:
    """Heuristic launch parameters (untuned on hardware; see bench/bench_kernels_cuda.py):
    rank chunks of 16 rows, a [16, 256] fp32 accumulator (32 registers a thread)."""
    return KernelConfig(block_n=256, block_k=16, num_warps=4, num_stages=2)


def bgmv_expand(
    y: torch.Tensor,  # [num_tokens, total_out], updated in place
    h: torch.Tensor,  # fp32 [num_splits, num_tokens, num_slices * max_rank]
    table: LoraSliceTable,
    token_slots: torch.Tensor,  # int32 [num_tokens], -1 = base
    token_scales: torch.Tensor | None = None,  # float32 [num_tokens]; None = all 1
    config: KernelConfig | None = None,
) -> None:
    """Semantics: y[t, off_k:off_k+n_k] += scale[t] * h[t, k*R:k*R+r] @ B_k[w[t], :r]
    with w = token_slots, r = ranks_k[w[t]], scale = token_scales (1 when None), h summed
    over its split dimension."""
    num_tokens = token_slots.shape[0]
    check_rows(y, "y", table, num_tokens, table.total_out)
    check_h(h, table, num_tokens)
    if h.stride(2) != 1:
        raise ValueError("h must have contiguous rows")
    check_index(token_slots, "token_slots", num_tokens, torch.int32, table.device)
    if token_scales is not None:
        check_index(token_scales, "token_scales", num_tokens, torch.float32, table.device)
    if config is None:
        config = default_config(table, num_tokens)
    check_config(config, uses_dot=False)
    if num_tokens == 0 or table.max_rank == 0:
        return
    grid = (num_tokens, triton.cdiv(table.max_out, config.block_n), table.num_slices)
    _bgmv_expand_kernel[grid](
        h,
        y,
        table.meta,
        token_slots,
        token_slots if token_scales is None else token_scales,
        h.shape[0],
        h.stride(0),
        h.stride(1),
        y.stride(0),
        y.stride(1),
        MAX_RANK=table.max_rank,
        HAS_SCALES=token_scales is not None,
        WEIGHTS_ALIGNED=table.aligned,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
