"""The semantics of the LoRA ops, as plain loops. Slow on purpose: tests compare to it.

Semantics (one call, one projection made of one or more output slices k):
    for each segment i with slot w = slot_indices[i] != -1 and each slice k:
        r = ranks_k[w]
        y[s[i]:s[i+1], off_k:off_k+n_k] += seg_scales[i] * (x[s[i]:s[i+1]] @ A_k[w, :r].T) @ B_k[w, :r]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import NO_ADAPTER, LoraBatchInfo


def add_lora_reference(
    y: torch.Tensor,  # [num_tokens, sum of slice widths]
    x: torch.Tensor,  # [num_tokens, in_features]
    slices: Sequence[LoraModuleBuffers],
    info: LoraBatchInfo,
) -> None:
    offset = 0
    for buffers in slices:
        width = buffers.out_features
        for i, slot in enumerate(info.slot_indices_host):
            start, end = info.seg_indptr_host[i], info.seg_indptr_host[i + 1]
            if slot == NO_ADAPTER or start == end:
                continue
            rank = buffers.ranks_host[slot]
            if rank == 0:
                continue
            a = buffers.lora_a[slot, :rank].float()  # [r, in]
            b = buffers.lora_b[slot, :rank].float()  # [r, out]
            delta = (x[start:end].float() @ a.T) @ b * info.seg_scales_host[i]
            y[start:end, offset : offset + width] += delta.to(y.dtype)
        offset += width


def add_lora_per_token(
    y: torch.Tensor,
    x: torch.Tensor,
    slices: Sequence[LoraModuleBuffers],
    token_slots: Sequence[int],
    token_scales: Sequence[float],
) -> None:
    """The same semantics one token at a time (checks the reference itself)."""
    for t, slot in enumerate(token_slots):
        if slot == NO_ADAPTER:
            continue
        offset = 0
        for buffers in slices:
            rank = buffers.ranks_host[slot]
            if rank:
                h = x[t].float() @ buffers.lora_a[slot, :rank].float().T  # [r]
                delta = h @ buffers.lora_b[slot, :rank].float() * token_scales[t]
                y[t, offset : offset + buffers.out_features] += delta.to(y.dtype)
            offset += buffers.out_features


def apply_dora_per_token(
    y: torch.Tensor,  # [num_tokens, sum of slice widths]
    bias: torch.Tensor | None,  # [sum of slice widths]
    slices: Sequence[LoraModuleBuffers],
    token_slots: Sequence[int],
) -> None:
    """loramux_kernels/dora.py's semantics one token at a time: a DoRA slot's rows are rescaled by
    its factor around the bias; plain LoRA slots and base tokens are left as they are."""
    for t, slot in enumerate(token_slots):
        offset = 0
        for buffers in slices:
            width = buffers.out_features
            if slot != NO_ADAPTER and buffers.dora_host[slot]:
                row = y[t, offset : offset + width].float()
                b = 0.0 if bias is None else bias[offset : offset + width].float()
                y[t, offset : offset + width] = (buffers.dora_scale[slot] * (row - b) + b).to(y.dtype)
            offset += width
