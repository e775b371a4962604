"""Stacked per-slot LoRA weight buffers: where an adapter lives while it is on the device.

One `LoraModuleBuffers` per adapted projection per layer (q, k, v, o, gate, up, down).
The adapter store writes an adapter into a free slot; the kernels read the slots named by
a step's `LoraBatchInfo`. Layout (row-major, contiguous):

    lora_a  [max_slots, max_rank, in_features]   rows = PEFT's lora_A.weight  [r, in]
    lora_b  [max_slots, max_rank, out_features]  rows = (scaling * PEFT's lora_B.weight).T
    ranks   int32 [max_slots]                     this module's rank per slot; 0 = not adapted

Rows past a slot's rank are zero, so reading up to any rank >= the true one is harmless;
the kernels read only `ranks[slot]` rows (mixed ranks cost their own size, not the max).
The adapter's alpha/r scaling is folded into lora_b when the slot is written.
"""

from __future__ import annotations

import torch


class LoraModuleBuffers:
    def __init__(
        self,
        max_slots: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.in_features = in_features
        self.out_features = out_features
        self.lora_a = torch.zeros(max_slots, max_rank, in_features, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_slots, max_rank, out_features, dtype=dtype, device=device)
        self.ranks = torch.zeros(max_slots, dtype=torch.int32, device=device)
        # Host mirror of `ranks`, read by CPU loops without touching device memory.
        self.ranks_host = [0] * max_slots

    @property
    def num_bytes_per_slot(self) -> int:
        elem = self.lora_a.element_size()
        return self.max_rank * (self.in_features + self.out_features) * elem

    def write(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        """Put one adapter's weights for this module into `slot`.

        lora_a: [r, in_features] and lora_b: [out_features, r], PEFT's own layout.
        """
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, self.in_features) or lora_b.shape != (self.out_features, rank):
            raise ValueError(
                f"LoRA shapes {tuple(lora_a.shape)} / {tuple(lora_b.shape)} do not fit a "
                f"[r, {self.in_features}] / [{self.out_features}, r] module"
            )
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the buffers' max rank {self.max_rank}")
        a = self.lora_a[slot]  # [max_rank, in]
        b = self.lora_b[slot]  # [max_rank, out]
        a[:rank].copy_(lora_a)
        if lora_b.device == b.device and lora_b.dtype == b.dtype:
            torch.mul(lora_b.t(), scaling, out=b[:rank])  # one pass, no temporary
        else:
            b[:rank].copy_(lora_b.t() * scaling)
        previous = self.ranks_host[slot]
        if previous > rank:  # rows past the previous rank are zero already
            a[rank:previous].zero_()
            b[rank:previous].zero_()
        self.ranks[slot] = rank
        self.ranks_host[slot] = rank

    def clear(self, slot: int) -> None:
        """Make `slot` contribute nothing (its module is not adapted)."""
        rank = self.ranks_host[slot]
        self.ranks[slot] = 0
        self.ranks_host[slot] = 0
        if rank:
            self.lora_a[slot, :rank].zero_()
            self.lora_b[slot, :rank].zero_()
