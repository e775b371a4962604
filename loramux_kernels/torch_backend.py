"""LoRA through plain torch matmuls: one shrink and one expand per segment and slice.

Efficient when segments are long (prefill: each matmul has many rows); for decode steps
the per-call overhead dominates and the CPU backend's fused kernel takes over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import NO_ADAPTER, LoraBatchInfo


def add_lora_segments(
    y: torch.Tensor,  # [num_tokens, sum of slice widths]
    x: torch.Tensor,  # [num_tokens, in_features]
    slices: Sequence[LoraModuleBuffers],
    info: LoraBatchInfo,
    segments: Sequence[int],
) -> None:
    """Apply the LoRA delta of the listed segment indices."""
    indptr = info.seg_indptr_host
    for i in segments:
        slot = info.slot_indices_host[i]
        start, end = indptr[i], indptr[i + 1]
        if slot == NO_ADAPTER or start == end:
            continue
        rows = x[start:end]
        scale = info.seg_scales_host[i]
        offset = 0
        for buffers in slices:
            rank = buffers.ranks_host[slot]
            width = buffers.out_features
            if rank:
                h = rows @ buffers.lora_a[slot, :rank].T  # [n, r]
                y[start:end, offset : offset + width].addmm_(h, buffers.lora_b[slot, :rank], alpha=scale)
            offset += width


class TorchLoraBackend:
    name = "torch"

    def prepare(self, info: LoraBatchInfo) -> None:
        """Nothing to plan: every call loops over the segments of `info`."""

    def add_lora(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        slices: Sequence[LoraModuleBuffers],
        info: LoraBatchInfo,
    ) -> None:
        add_lora_segments(y, x, slices, info, range(info.num_segments))
