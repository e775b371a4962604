"""Paged attention on CUDA: decodes read the KV cache in place (loramux_kernels/triton/paged_decode.py).

The step's metadata carries the decodes' block tables and context lengths (one host-to-
device copy, no per-position gather indices); prefill chunks run through SDPA
(torch_paged.py), flash attention on a GPU.
"""

from __future__ import annotations

import torch

from loramux.kernels.attention.backend import AttentionLayer
from loramux.kernels.attention.torch_paged import DecodeGroup, TorchPagedAttention
from loramux.kernels.triton.paged_decode import paged_decode


class TritonPagedAttention(TorchPagedAttention):
    name = "triton"
    decode_gather = False  # the kernel walks the block tables

    def _decode(
        self,
        out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        group: DecodeGroup,
        layer: AttentionLayer,
    ) -> None:
        paged_decode(
            out, q.contiguous(), k_cache, v_cache, group.rows, group.block_tables, group.context_lens,
            layer.scale, layer.window, layer.softcap,
        )  # fmt: skip
