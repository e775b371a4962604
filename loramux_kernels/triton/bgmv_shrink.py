"""BGMV shrink: the LoRA A product of each token with its own adapter (decode batches).

Semantics: h[t, k*R : k*R + r] = x[t] @ A_k[w[t], :r].T
    for each token t with slot w[t] = token_slots[t] != -1 and each slice k, r = ranks_k[w[t]];
    h is returned as split-K partials (sum over its first dimension).

Reads (see loramux_kernels/triton/common.py for the table):
    x            [num_tokens, in_features]                     any strides
    token_slots  int32 [num_tokens]                            -1 = base, no delta
    A_k          lora_a [max_slots, max_rank_k, in_features]   contiguous, one per slice
    ranks_k      int32 [max_slots]
Writes:
    h            fp32 [split_k, num_tokens, num_slices * R]    contiguous, fresh each call

Grid: (num_tokens, num_slices * split_k, cdiv(R, BLOCK_N)). One token per program: a
matrix-vector product in registers (tl.dot needs 16 rows), fp32 accumulation. Base tokens
and rank blocks at or past the slot's rank exit at once, so mixed ranks are not padded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels.triton.common import (
    META_A_PTR,
    META_A_SLOT_STRIDE,
    META_FIELDS,
    META_RANKS_PTR,
    KernelConfig,
    LoraSliceTable,
    check_config,
    check_index,
    check_rows,
    choose_split_k,
    next_power_of_2,
    split_len,
)


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr,  # [num_tokens, in_features]
    h_ptr,  # fp32 [split_k, num_tokens, num_slices * MAX_RANK]
    meta_ptr,  # int64 [num_slices, META_FIELDS]
    token_slots_ptr,  # int32 [num_tokens]
    in_features,  # also lora_a's row stride (contiguous buffers)
    k_per_split,  # in_features elements per split, a multiple of BLOCK_K
    stride_xm,
    stride_xk,
    stride_hs,
    stride_hm,
    MAX_RANK: tl.constexpr,
    SPLIT_K: tl.constexpr,
    WEIGHTS_ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    slice_id = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    slot = tl.load(token_slots_ptr + token)
    if slot < 0:  # base token: no adapter, no work
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

    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < rank
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, in_features)

    # x row chunk [BLOCK_K]; A tile [BLOCK_N, BLOCK_K] = A[slot, n, k] (k contiguous)
    x_ptrs = x_ptr + token.to(tl.int64) * stride_xm + (k_start + offs_k) * stride_xk
    a_ptrs = a_ptr + slot.to(tl.int64) * a_slot_stride + offs_n[:, None] * in_features + (k_start + offs_k)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced over k once, at the end
    for k in range(k_start, k_end, BLOCK_K):
        mask_k = (k + offs_k) < k_end
        x = tl.load(x_ptrs, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += a * x[None, :]
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K
    h_row = tl.sum(acc, axis=1)  # [BLOCK_N]

    # Every split stores its partial (zeros when its chunk is empty): expand sums them all.
    h_ptrs = h_ptr + split * stride_hs + token.to(tl.int64) * stride_hm + slice_id * MAX_RANK + offs_n
    tl.store(h_ptrs, h_row, mask=mask_n)


def default_config(table: LoraSliceTable, num_tokens: int) -> KernelConfig:
    """Heuristic launch parameters (untuned on hardware; see bench/bench_kernels_cuda.py):
    a [BLOCK_N, BLOCK_K] fp32 accumulator of 4096 elements, 32 registers a thread; half that
    when the weights are not 16-aligned (scalar loads need a register per address)."""
    block_n = min(max(next_power_of_2(table.max_rank), 16), 32)
    block_k = (4096 if table.aligned else 2048) // block_n
    programs = num_tokens * table.num_slices * -(-table.max_rank // block_n)
    split_k = choose_split_k(programs, table.in_features, block_k, table.device)
    return KernelConfig(block_n=block_n, block_k=block_k, split_k=split_k, num_warps=4, num_stages=2)


def bgmv_shrink(
    x: torch.Tensor,  # [num_tokens, in_features]
    table: LoraSliceTable,
    token_slots: torch.Tensor,  # int32 [num_tokens], -1 = base
    config: KernelConfig | None = None,
) -> torch.Tensor:  # fp32 [split_k, num_tokens, num_slices * max_rank]
    """Semantics: h[t, k*R : k*R+r] = x[t] @ A_k[w[t], :r].T, w = token_slots, r = ranks_k[w[t]]
    (h summed over its split dimension; rows of tokens with w[t] = -1 are left unwritten)."""
    num_tokens = token_slots.shape[0]
    check_rows(x, "x", table, num_tokens, table.in_features)
    check_index(token_slots, "token_slots", num_tokens, torch.int32, table.device)
    if config is None:
        config = default_config(table, num_tokens)
    check_config(config, uses_dot=False)
    split_k = config.split_k
    h = torch.empty(split_k, num_tokens, table.num_slices * table.max_rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or table.max_rank == 0:
        return h
    grid = (num_tokens, table.num_slices * split_k, triton.cdiv(table.max_rank, config.block_n))
    _bgmv_shrink_kernel[grid](
        x,
        h,
        table.meta,
        token_slots,
        table.in_features,
        split_len(table.in_features, split_k, config.block_k),
        x.stride(0),
        x.stride(1),
        h.stride(0),
        h.stride(1),
        MAX_RANK=table.max_rank,
        SPLIT_K=split_k,
        WEIGHTS_ALIGNED=table.aligned,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return h
