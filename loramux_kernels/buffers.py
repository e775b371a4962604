"""Stacked per-slot LoRA weight buffers: where an adapter lives while it is on the device.

One `LoraModuleBuffers` per adapted projection per layer (q, k, v, o, gate, up, down).
The adapter store writes an adapter into a free slot; the kernels read the slots named by
a step's `LoraBatchInfo`. Layout (row-major, contiguous):

    lora_a  [max_slots, max_rank, in_features]   rows = PEFT's lora_A.weight  [r, in]
    lora_b  [max_slots, max_rank, out_features]  rows = (scaling * PEFT's lora_B.weight).T
    ranks   int32 [max_slots]                     this module's rank per slot; 0 = not adapted
    dora_scale  fp32 [max_slots + 1, out_features]  DoRA's m / ||W + s B A||_row per slot;
                                                     1 for plain LoRA, and in the last row, which
                                                     base tokens (slot -1) index (loramux_kernels/dora.py)

Rows past a slot's rank are zero, so reading up to any rank >= the true one is harmless;
the kernels read only `ranks[slot]` rows (mixed ranks cost their own size, not the max).
The adapter's alpha/r scaling is folded into lora_b when the slot is written. A DoRA
adapter's factor is computed once, when it is written, from `base_weight` (the model's
frozen weight of this projection, [out_features, in_features]) in fp32.

`LoraModuleStack` allocates one projection's buffers for every layer at once, as
[num_layers, ...] tensors whose index i is layer i's LoraModuleBuffers (the same layout,
views). The kernels see no difference; the adapter store writes a slot of all layers with
one copy per factor instead of one per layer (a few large copies, not hundreds of small ones).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.kernels.slot_copy import copy_blocks, prepare as prepare_slot_copy


def _zeroed_buffers(
    leading: tuple[int, ...],
    max_slots: int,
    max_rank: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lora_a [*leading, slots, max_rank, in], lora_b [*leading, slots, max_rank, out],
    ranks int32 [*leading, slots], dora_scale fp32 [*leading, slots + 1, out]): every slot
    starts empty (rank 0, DoRA factor 1)."""
    return (
        torch.zeros(*leading, max_slots, max_rank, in_features, dtype=dtype, device=device),
        torch.zeros(*leading, max_slots, max_rank, out_features, dtype=dtype, device=device),
        torch.zeros(*leading, max_slots, dtype=torch.int32, device=device),
        torch.ones(*leading, max_slots + 1, out_features, dtype=torch.float32, device=device),
    )


def dora_factor(
    magnitude: torch.Tensor,  # [out]
    base_weight: torch.Tensor,  # [out, in]
    lora_a: torch.Tensor,  # [r, in]
    lora_b: torch.Tensor,  # [out, r], PEFT's layout
    scaling: float,
) -> torch.Tensor:  # fp32 [out]
    """Semantics: m / ||W + scaling * B @ A||_row, all in fp32 (peft's DoRA weight norm)."""
    weight = base_weight.float().addmm(lora_b.float(), lora_a.float(), alpha=scaling)  # [out, in]
    return magnitude.to(weight.device, torch.float32) / torch.linalg.vector_norm(weight, dim=1)


class LoraModuleBuffers:
    def __init__(
        self,
        max_slots: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str,
        stack: LoraModuleStack | None = None,
        layer: int = 0,
    ) -> None:
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.in_features = in_features
        self.out_features = out_features
        self.stack = stack  # the stack these buffers are layer `layer` of, or None
        if stack is None:
            self.lora_a, self.lora_b, self.ranks, self.dora_scale = _zeroed_buffers(
                (), max_slots, max_rank, in_features, out_features, dtype, device
            )
        else:
            self.lora_a, self.lora_b = stack.lora_a[layer], stack.lora_b[layer]
            self.ranks, self.dora_scale = stack.ranks[layer], stack.dora_scale[layer]
        # Host mirror of `ranks`, read by CPU loops without touching device memory.
        self.ranks_host = [0] * max_slots
        # Host mirror of which slots hold a DoRA factor (!= 1), and their count: a step
        # whose slots hold none skips the rescale (loramux_kernels/dora.py).
        self.dora_host = [False] * max_slots
        self.num_dora_slots = 0
        # The model's frozen weight of this projection [out_features, in_features] (a view),
        # set by the model's loader; DoRA's norms need it. None: DoRA cannot be written here.
        self.base_weight: torch.Tensor | None = None
        # Per-slot views, made once: a slot write is ~2 tensor ops per module, and indexing
        # anew each time would cost as much as the copies themselves.
        self._slot_a = self.lora_a.unbind(0)  # max_slots x [max_rank, in_features]
        self._slot_b = self.lora_b.unbind(0)  # max_slots x [max_rank, out_features]

    @property
    def num_bytes_per_slot(self) -> int:
        elem = self.lora_a.element_size()
        return self.max_rank * (self.in_features + self.out_features) * elem

    def write(
        self,
        slot: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """Put one adapter's weights for this module into `slot`.

        lora_a: [r, in_features] and lora_b: [out_features, r], PEFT's own layout;
        magnitude: DoRA's m [out_features], or None for plain LoRA.
        Rows past the previous occupant's rank are zero already (write and clear keep it
        so), so only rows [r, previous rank) are cleared: rewriting a slot costs the copy.
        """
        rank = lora_a.shape[0]
        if lora_a.shape != (rank, self.in_features) or lora_b.shape != (self.out_features, rank):
            raise ValueError(
                f"LoRA shapes {tuple(lora_a.shape)} / {tuple(lora_b.shape)} do not fit a "
                f"[r, {self.in_features}] / [{self.out_features}, r] module"
            )
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the buffers' max rank {self.max_rank}")
        factor = None if magnitude is None else self._dora_factor(magnitude, lora_a, lora_b, scaling)
        a = self._slot_a[slot]  # [max_rank, in]
        b = self._slot_b[slot]  # [max_rank, out]
        if rank < self.max_rank:
            a, b = a[:rank], b[:rank]
        a.copy_(lora_a)
        if lora_b.device == b.device and lora_b.dtype == b.dtype:
            torch.mul(lora_b.t(), scaling, out=b)  # one pass, no temporary
        else:
            b.copy_(lora_b.t() * scaling)
        previous = self.ranks_host[slot]
        if previous > rank:  # rows past the previous rank are zero already
            self.lora_a[slot, rank:previous].zero_()
            self.lora_b[slot, rank:previous].zero_()
        if previous != rank:
            self.ranks[slot] = rank
            self.ranks_host[slot] = rank
        self.set_dora(slot, factor)

    def _dora_factor(
        self, magnitude: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        if self.base_weight is None:
            raise ValueError("these LoRA buffers have no base weight: DoRA adapters cannot be written")
        if magnitude.shape != (self.out_features,):
            raise ValueError(f"DoRA magnitude {tuple(magnitude.shape)} does not fit [{self.out_features}]")
        device = self.base_weight.device
        return dora_factor(magnitude, self.base_weight, lora_a.to(device), lora_b.to(device), scaling)

    def set_dora(self, slot: int, factor: torch.Tensor | None) -> None:
        """Put `slot`'s DoRA factor (fp32 [out_features]), or 1 for plain LoRA (None)."""
        was = self.dora_host[slot]
        if factor is None:
            if was:
                self.dora_scale[slot].fill_(1.0)
        else:
            self.dora_scale[slot].copy_(factor)
        self.dora_host[slot] = factor is not None
        self.num_dora_slots += int(factor is not None) - int(was)

    def clear(self, slot: int) -> None:
        """Make `slot` contribute nothing (its module is not adapted)."""
        rank = self.ranks_host[slot]
        self.ranks[slot] = 0
        self.ranks_host[slot] = 0
        if rank:
            self.lora_a[slot, :rank].zero_()
            self.lora_b[slot, :rank].zero_()
        self.set_dora(slot, None)


class LoraModuleStack:
    """One projection's slot buffers for all layers in one allocation (see the module docstring).

        lora_a  [num_layers, max_slots, max_rank, in_features]
        lora_b  [num_layers, max_slots, max_rank, out_features]
        ranks   int32 [num_layers, max_slots]
        dora_scale  fp32 [num_layers, max_slots + 1, out_features]
    `layers[i]` is layer i's LoraModuleBuffers, views of index i.
    """

    def __init__(
        self,
        num_layers: int,
        max_slots: int,
        max_rank: int,
        in_features: int,
        out_features: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.lora_a, self.lora_b, self.ranks, self.dora_scale = _zeroed_buffers(
            (num_layers,), max_slots, max_rank, in_features, out_features, dtype, device
        )
        prepare_slot_copy(dtype, device)
        self.layers: tuple[LoraModuleBuffers, ...] = tuple(
            LoraModuleBuffers(max_slots, max_rank, in_features, out_features, dtype, device, self, i)
            for i in range(num_layers)
        )

    def write(
        self,
        slot: int,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scalings: Sequence[float],
        magnitudes: torch.Tensor | None = None,
    ) -> None:
        """Put one adapter's weights for this projection in every layer into `slot`.

        lora_a: [num_layers, r, in_features], lora_b: [num_layers, out_features, r] (PEFT's
        layout per layer), scalings: one per layer, magnitudes: DoRA's m [num_layers,
        out_features] or None. The same as layer i's `write(slot, lora_a[i], lora_b[i],
        scalings[i], magnitudes[i])` for every i, in two copies (plus the DoRA factors).
        """
        num_layers, rank = len(self.layers), lora_a.shape[1]
        first = self.layers[0]
        if (
            lora_a.shape != (num_layers, rank, first.in_features)
            or lora_b.shape != (num_layers, first.out_features, rank)
            or len(scalings) != num_layers
        ):
            raise ValueError(
                f"stacked LoRA shapes {tuple(lora_a.shape)} / {tuple(lora_b.shape)} with "
                f"{len(scalings)} scalings do not fit {num_layers} layers of "
                f"[r, {first.in_features}] / [{first.out_features}, r]"
            )
        if rank > first.max_rank:
            raise ValueError(f"rank {rank} exceeds the buffers' max rank {first.max_rank}")
        factors = (
            [None] * num_layers
            if magnitudes is None
            else [
                layer._dora_factor(magnitudes[i], lora_a[i], lora_b[i], scalings[i])
                for i, layer in enumerate(self.layers)
            ]
        )
        a = self.lora_a[:, slot, :rank]  # [num_layers, r, in]
        b = self.lora_b[:, slot, :rank]  # [num_layers, r, out]
        if not copy_blocks(a, lora_a):  # the CPU's streaming copy, else torch
            a.copy_(lora_a)
        # The scalings as a tensor in the op-math type a Python float scalar would get, so
        # the products round exactly as in LoraModuleBuffers.write.
        scale_dtype = torch.float64 if lora_b.dtype == torch.float64 else torch.float32
        scale = torch.tensor(scalings, dtype=scale_dtype, device=lora_b.device).view(num_layers, 1, 1)
        if not copy_blocks(b, lora_b.transpose(1, 2), scale.view(num_layers)):  # likewise
            if lora_b.device == b.device:
                torch.mul(lora_b.transpose(1, 2), scale, out=b)  # one pass, no temporary
            else:
                b.copy_(torch.mul(lora_b.transpose(1, 2), scale).to(lora_b.dtype))
        previous = [layer.ranks_host[slot] for layer in self.layers]
        for i, before in enumerate(previous):
            if before > rank:  # rows past the previous rank are zero already
                self.lora_a[i, slot, rank:before].zero_()
                self.lora_b[i, slot, rank:before].zero_()
        if any(before != rank for before in previous):
            self.ranks[:, slot] = rank
            for layer in self.layers:
                layer.ranks_host[slot] = rank
        for layer, factor in zip(self.layers, factors):
            layer.set_dora(slot, factor)
