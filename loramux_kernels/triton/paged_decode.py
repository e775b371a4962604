"""Paged decode attention for CUDA: each decode reads its context from the KV cache in place.

Semantics, for decode b (query row rows[b], context length n = context_lens[b], the query
at position n - 1) and query head h (KV head g = h // (H / KVH)):
    j in [lo, n), lo = max(0, n - window) with a window, else 0
    s_j = scale * q[rows[b], h] . K[j, g];  s_j = softcap * tanh(s_j / softcap) with soft-capping
    out[rows[b], h] = sum_j softmax(s)_j * V[j, g]
K[j, g] = k_cache[block_tables[b, j // block_size], j % block_size, g] (likewise V).

Reads:
    q             [num_tokens, num_heads, head_dim]               rows strided, heads contiguous
    k/v_cache     [num_blocks, block_size, num_kv_heads, head_dim] contiguous
    rows          int64 [num_decodes]
    block_tables  int64 [num_decodes, max_blocks]                 contiguous
    context_lens  int64 [num_decodes]
Writes:
    out           [num_tokens, num_heads, head_dim]               only the decode rows

Grid: (num_decodes, num_kv_heads). One program walks one sequence's context for all the
query heads sharing a KV head (each K/V row read once), BLOCK_N positions at a time with
an online softmax in fp32 (flash-decoding without the split: decode contexts here are
short next to a GPU's parallelism over decodes x heads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loramux.kernels.triton.common import next_power_of_2

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_N = 32  # context positions per iteration


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    rows_ptr,  # int64 [num_decodes]
    tables_ptr,  # int64 [num_decodes, max_blocks]
    lens_ptr,  # int64 [num_decodes]
    stride_out,  # row stride of out
    stride_q,  # row stride of q
    stride_cache_block,
    stride_cache_token,
    max_blocks,
    block_size,
    scale,
    window,
    softcap,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP rounded up to a power of 2
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0)
    g = tl.program_id(1)
    row = tl.load(rows_ptr + b)
    n = tl.load(lens_ptr + b)
    lo = n * 0
    if USE_WINDOW:
        lo = tl.maximum(n - window, 0)
    offs_h = tl.arange(0, GROUP_P)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = g * GROUP + offs_h  # [GROUP_P] query heads of this KV head
    q = tl.load(
        q_ptr + row * stride_q + heads[:, None] * HEAD_DIM + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    ).to(tl.float32)  # [GROUP_P, HEAD_DIM_P]
    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, HEAD_DIM_P], tl.float32)
    for start in range(lo, n, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < n
        block = tl.load(tables_ptr + b * max_blocks + pos // block_size, mask=valid, other=0)
        where = block * stride_cache_block + (pos % block_size) * stride_cache_token + g * HEAD_DIM  # [BLOCK_N]
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + where[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_P, BLOCK_N]
        if USE_SOFTCAP:
            # softcap * tanh(s / softcap), tanh through exp (no libdevice needed)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])  # [GROUP_P, BLOCK_N]
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + where[:, None] + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    result = acc / total[:, None]
    tl.store(
        out_ptr + row * stride_out + heads[:, None] * HEAD_DIM + offs_d[None, :],
        result.to(out_ptr.dtype.element_ty),
        mask=mask_h[:, None] & mask_d[None, :],
    )


def paged_decode(
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    rows: torch.Tensor,  # int64 [num_decodes]
    block_tables: torch.Tensor,  # int64 [num_decodes, max_blocks]
    context_lens: torch.Tensor,  # int64 [num_decodes]
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Semantics: see the module docstring; writes out[rows]."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"paged_decode takes {SUPPORTED_DTYPES}, not {q.dtype}")
    for name, t in (("out", out), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be a {q.dtype} tensor on {q.device} like q")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape != v_cache.shape:
        raise ValueError("the KV caches must be contiguous and of one shape")
    for name, t in (("q", q), ("out", out)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} must have contiguous [num_heads, head_dim] rows")
    for name, t in (("rows", rows), ("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype != torch.int64 or not t.is_contiguous() or t.device != q.device:
            raise ValueError(f"{name} must be contiguous int64 on {q.device}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    num_decodes = rows.shape[0]
    if num_decodes == 0:
        return
    group = num_heads // num_kv_heads
    _paged_decode_kernel[(num_decodes, num_kv_heads)](
        out, q, k_cache, v_cache, rows, block_tables, context_lens,
        out.stride(0), q.stride(0), k_cache.stride(0), k_cache.stride(1),
        block_tables.shape[1], block_size, scale, window or 0, softcap or 0.0,
        GROUP=group, GROUP_P=next_power_of_2(group), HEAD_DIM=head_dim, HEAD_DIM_P=next_power_of_2(head_dim),
        USE_WINDOW=window is not None, USE_SOFTCAP=softcap is not None, BLOCK_N=BLOCK_N,
    )  # fmt: skip
