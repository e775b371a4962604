"""Write a loaded adapter into one slot of the model's stacked LoRA buffers.

The buffers (kernels/buffers.py) hold every adapted projection of every layer; a slot is
one adapter's place in all of them at once. Projections the adapter does not adapt are
cleared in that slot, so a slot never keeps a previous occupant's weights.
"""

from __future__ import annotations

from collections.abc import Mapping

from adapter_store.format import LoraAdapter
from kernels.buffers import LoraModuleBuffers


def write_adapter_to_slot(
    buffers: Mapping[tuple[int, str], LoraModuleBuffers],  # (layer, module) -> buffers
    slot: int,
    adapter: LoraAdapter,
) -> None:
    unknown = set(adapter.modules) - set(buffers)
    if unknown:
        raise ValueError(f"adapter {adapter.adapter_id!r} adapts modules the model lacks: {sorted(unknown)[:3]}")
    for key, module_buffers in buffers.items():
        weights = adapter.modules.get(key)
        if weights is None:
            module_buffers.clear(slot)
        else:
            module_buffers.write(slot, weights.lora_a, weights.lora_b, weights.scaling)


def clear_slot(buffers: Mapping[tuple[int, str], LoraModuleBuffers], slot: int) -> None:
    for module_buffers in buffers.values():
        module_buffers.clear(slot)
