"""LoRA on the input embedding (PEFT's lora_embedding_A/B), batched per token by segment.

The embedding's LoRA is a linear LoRA on each token's one-hot row: lora_embedding_A
[r, vocab] sits in the slot buffers as lora_a [max_slots, max_rank, vocab], so the
shrink is a gather of the token ids' columns instead of a matmul. Torch ops, one
gather and one matmul per segment: the same code on every device and LoRA backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import NO_ADAPTER, LoraBatchInfo


def step_adapts(slices: Sequence[LoraModuleBuffers], info: LoraBatchInfo) -> bool:
    """Whether a slot of this step adapts any of these slices (host data only)."""
    return any(b.ranks_host[slot] for slot in info.slot_indices_host if slot != NO_ADAPTER for b in slices)


def add_embedding_lora(
    y: torch.Tensor,  # [num_tokens, hidden], the embedded tokens, updated in place
    token_ids: torch.Tensor,  # int64 [num_tokens]
    buffers: LoraModuleBuffers,  # in_features = vocab, out_features = hidden
    info: LoraBatchInfo,
) -> None:
    """Semantics: for each segment i with slot w != -1 and r = ranks[w]:
    y[s[i]:s[i+1]] += seg_scales[i] * A[w, :r, ids[s[i]:s[i+1]]].T @ B[w, :r]"""
    indptr = info.seg_indptr_host
    for i, slot in enumerate(info.slot_indices_host):
        start, end = indptr[i], indptr[i + 1]
        if slot == NO_ADAPTER or start == end:
            continue
        rank = buffers.ranks_host[slot]
        if rank:
            h = buffers.lora_a[slot, :rank, token_ids[start:end]]  # [r, n]
            y[start:end].addmm_(h.T, buffers.lora_b[slot, :rank], alpha=info.seg_scales_host[i])
