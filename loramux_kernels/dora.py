"""DoRA at serving time: one per-token elementwise rescale, gathered by slot.

DoRA (peft `use_dora`) serves y = m / ||W + s B A||_row * (x @ W.T + s (x @ A.T) @ B.T) + bias.
The factor m / ||W + s B A||_row (fp32 [out_features]) depends on the adapter only, so it is
computed once, when the adapter is written into a slot (LoraModuleBuffers.write), and kept
in the slot's `dora_scale` row. A step then adds, after the usual LoRA delta, one gather of
those rows by each token's slot and one multiply. Plain LoRA slots hold 1, and the last
row (1 too) is what base tokens (slot -1) index, so DoRA and plain LoRA share a batch.

Backend-agnostic torch ops: the same code runs after every LoRA backend (torch, CPU, Triton).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import NO_ADAPTER, LoraBatchInfo


def step_uses_dora(slices: Sequence[LoraModuleBuffers], info: LoraBatchInfo) -> bool:
    """Whether a slot of this step holds a DoRA adapter on any of these slices (host data)."""
    if not any(b.num_dora_slots for b in slices):  # the common case: one int per slice
        return False
    return any(b.dora_host[slot] for slot in info.slot_indices_host if slot != NO_ADAPTER for b in slices)


def apply_dora(
    y: torch.Tensor,  # [num_tokens, sum of slice widths]: x @ W.T + bias + LoRA delta, in place
    bias: torch.Tensor | None,  # [sum of slice widths]
    slices: Sequence[LoraModuleBuffers],
    info: LoraBatchInfo,
) -> None:
    """Semantics: for each token t with slot w = token_slots[t] and slice k at offset off_k:
    y[t, off_k:off_k+n_k] = dora_scale_k[w] * (y[t, off_k:off_k+n_k] - b[off_k:off_k+n_k]) + b[...]
    with dora_scale_k[w] = 1 for plain LoRA slots and base tokens (w = -1)."""
    if not step_uses_dora(slices, info):
        return
    # Index -1 (base tokens) is the last row of every dora_scale: all ones.
    factor = torch.cat([b.dora_scale[info.token_slots] for b in slices], dim=1)  # fp32 [T, out]
    if bias is not None:
        y.sub_(bias)
    y.mul_(factor)
    if bias is not None:
        y.add_(bias)
