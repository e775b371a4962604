"""Paged attention on the CPU: decodes read the KV cache in place (loramux_kernels/cpu/paged_decode.c).

The torch backend gathers every decode's whole context out of the cache into a padded
[B, KVH, max_ctx, D] copy each layer, and builds per-position gather indices on the host
each step. Here the decodes go to one C/OpenMP call per layer that walks each sequence's
block table (fp32 and bf16, fp32 softmax and accumulation); the step's metadata carries
only the block tables. Prefill chunks stay on SDPA (torch_paged.py), which is at its best
on long query blocks. Shapes the kernel does not take (fp16, more than 32 query heads per
KV head, head_dim > 256) fall back to the torch decode for that call.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from loramux.kernels.attention.backend import AttentionLayer
from loramux.kernels.attention.torch_paged import DecodeGroup, TorchPagedAttention
from loramux.kernels.cpu_build import load_kernel_library

SOURCE = "paged_decode"
ENTRY_POINTS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}
MAX_GROUP, MAX_HEAD_DIM = 32, 256  # as loramux_kernels/cpu/paged_decode.c

_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class PagedDecodeError(RuntimeError):
    """The C kernel refused its arguments or ran out of memory."""


def paged_decode(
    library: ctypes.CDLL,
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]; rows `rows` are written
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotary applied
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    rows: torch.Tensor,  # int64 [B]
    block_tables: torch.Tensor,  # int64 [B, max_blocks]
    context_lens: torch.Tensor,  # int64 [B]
    layer: AttentionLayer,
    num_threads: int | None = None,
) -> None:
    """Semantics: for decode b, head h (KV head h // (H / KVH)), query position n - 1 with
    n = context_lens[b]: out[rows[b], h] = softmax_j(cap(scale * q[rows[b], h] . K_j)) @ V_j
    over j in [max(0, n - window), n), K_j / V_j read through block_tables[b]."""
    dtype = q.dtype
    if dtype not in ENTRY_POINTS:
        raise ValueError(f"paged_decode takes float32 or bfloat16, not {dtype}")
    for name, t in (("out", out), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != dtype or t.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU {dtype} tensor like q")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    for name, t in (("q", q), ("out", out)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} must have contiguous [num_heads, head_dim] rows")
    for name, t in (("rows", rows), ("block_tables", block_tables), ("context_lens", context_lens)):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous int64")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}")
    num_decodes = rows.shape[0]
    if num_decodes == 0:
        return
    kernel = getattr(library, ENTRY_POINTS[dtype])
    kernel.restype = _I
    kernel.argtypes = [_P, _I64, _P, _I64, _P, _P, _P, _P, _I64, _P, _I, _I, _I, _I, _I, _F, _I, _F, _I]
    rc = kernel(
        out.data_ptr(), out.stride(0), q.data_ptr(), q.stride(0),
        k_cache.data_ptr(), v_cache.data_ptr(),
        rows.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
        num_decodes, num_heads, num_kv_heads, head_dim, block_size,
        layer.scale, layer.window or 0, layer.softcap or 0.0,
        num_threads or torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise PagedDecodeError(f"paged_decode failed ({rc}): heads {num_heads}/{num_kv_heads}, head_dim {head_dim}")


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"
    decode_gather = False  # the kernel walks the block tables

    def __init__(self, library: ctypes.CDLL, num_threads: int | None = None) -> None:
        self._library = library
        self._num_threads = num_threads

    @classmethod
    def create(cls, cache_dir: Path | None = None) -> CpuPagedAttention:
        """Raises KernelBuildError where the C kernel cannot be built."""
        return cls(load_kernel_library(SOURCE, cache_dir))

    def _decode(
        self,
        out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        group: DecodeGroup,
        layer: AttentionLayer,
    ) -> None:
        num_heads, head_dim = q.shape[1], q.shape[2]
        group_size = num_heads // k_cache.shape[2]
        if q.dtype not in ENTRY_POINTS or group_size > MAX_GROUP or head_dim > MAX_HEAD_DIM:
            self._gather_decode(out, q, k_cache, v_cache, group, layer)
            return
        paged_decode(
            self._library, out, q.contiguous(), k_cache, v_cache,
            group.rows, group.block_tables, group.context_lens, layer, self._num_threads,
        )  # fmt: skip

    def _gather_decode(self, out, q, k_cache, v_cache, group: DecodeGroup, layer: AttentionLayer) -> None:
        """The torch path for shapes the kernel does not take: it needs the gather indices."""
        meta_group = gather_group(group, k_cache.shape[1], layer)
        super()._decode(out, q, k_cache, v_cache, meta_group, layer)


def gather_group(group: DecodeGroup, block_size: int, layer: AttentionLayer) -> DecodeGroup:
    """`group` with the torch path's gather indices and mask for `layer`, built on device."""
    lens = group.context_lens  # [B]
    max_ctx = int(lens.max())
    positions = torch.arange(max_ctx, device=lens.device)[None, :]  # [1, max_ctx]
    full = positions < lens[:, None]  # [B, max_ctx]
    block_index = (positions // block_size).clamp(max=group.block_tables.shape[1] - 1)  # [1, max_ctx]
    blocks = group.block_tables.gather(1, block_index.expand(lens.shape[0], -1))  # [B, max_ctx]
    gather = torch.where(full, blocks * block_size + positions % block_size, 0)
    visible = full
    if layer.window is not None:
        visible = full & (positions > lens[:, None] - 1 - layer.window)
    return DecodeGroup(
        rows=group.rows, context_lens=lens, block_tables=group.block_tables,
        gather=gather, masks={layer.window: visible[:, None, None, :]},
    )  # fmt: skip
