"""Write a loaded adapter into one slot of the model's stacked LoRA buffers.

The buffers (loramux_kernels/buffers.py) hold every adapted projection of every layer; a slot is
one adapter's place in all of them at once. Projections the adapter does not adapt are
cleared in that slot, so a slot never keeps a previous occupant's weights. A DoRA
adapter's per-row factors are computed here, once per write (LoraModuleBuffers.write).

A projection the adapter adapts in every layer with one rank (LoraAdapter.stacks) whose
buffers are one LoraModuleStack is written for all layers at once: two large copies
instead of two small ones per layer, which is most of the time of a CPU -> device load.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loramux.adapter_store.format import BaseModelSpec, LoraAdapter
from loramux.kernels.buffers import LoraModuleBuffers, LoraModuleStack


def write_adapter_to_slot(
    buffers: Mapping[tuple[int, str], LoraModuleBuffers],  # (layer, module) -> buffers
    slot: int,
    adapter: LoraAdapter,
) -> None:
    unknown = set(adapter.modules) - set(buffers)
    if unknown:
        raise ValueError(f"adapter {adapter.adapter_id!r} adapts modules the model lacks: {sorted(unknown)[:3]}")
    stacked = set()
    for module, weights in adapter.stacks.items():
        stack = _stack_of(buffers, module, len(weights.scalings))
        if stack is not None:
            stack.write(slot, weights.lora_a, weights.lora_b, weights.scalings, weights.magnitudes)
            stacked.add(module)
    for key, module_buffers in buffers.items():
        if key[1] in stacked:
            continue
        weights = adapter.modules.get(key)
        if weights is None:
            module_buffers.clear(slot)
        else:
            module_buffers.write(slot, weights.lora_a, weights.lora_b, weights.scaling, weights.magnitude)


def _stack_of(
    buffers: Mapping[tuple[int, str], LoraModuleBuffers], module: str, num_layers: int
) -> LoraModuleStack | None:
    """The LoraModuleStack whose layers are exactly `module`'s buffers of layers 0.., or None."""
    first = buffers.get((0, module))
    stack = first.stack if first is not None else None
    if stack is None or len(stack.layers) != num_layers:
        return None
    if any(buffers.get((layer, module)) is not b for layer, b in enumerate(stack.layers)):
        return None
    return stack


def clear_slot(buffers: Mapping[tuple[int, str], LoraModuleBuffers], slot: int) -> None:
    for module_buffers in buffers.values():
        module_buffers.clear(slot)


def check_buffers(
    buffers: Mapping[tuple[int, str], LoraModuleBuffers],
    spec: BaseModelSpec,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[int, int]:
    """(max_slots, max_rank) of the model's LoRA buffers, checked against the spec."""
    if not buffers:
        raise ValueError("the model has no LoRA buffers (max_lora_slots is 0)")
    expected = set(spec.modules())
    if set(buffers) != expected:
        missing = sorted(expected - set(buffers))[:3]
        extra = sorted(set(buffers) - expected)[:3]
        raise ValueError(f"LoRA buffers do not match the spec: missing {missing}, extra {extra}")
    first = next(iter(buffers.values()))
    for (layer, module), b in buffers.items():
        if (b.max_slots, b.max_rank) != (first.max_slots, first.max_rank):
            raise ValueError(f"LoRA buffers of ({layer}, {module}) differ in slots or rank")
        if (b.in_features, b.out_features) != spec.serving_shape(module):
            raise ValueError(
                f"LoRA buffers of ({layer}, {module}) are {b.in_features} -> {b.out_features}, "
                f"the spec says {spec.serving_shape(module)}"
            )
        if b.lora_a.dtype != dtype or b.lora_a.device.type != device.type:
            raise ValueError(
                f"LoRA buffers are {b.lora_a.dtype} on {b.lora_a.device}, "
                f"the store serves {dtype} on {device}"
            )
    if first.max_slots < 1 or first.max_rank < 1:
        raise ValueError("LoRA buffers need max_slots >= 1 and max_rank >= 1")
    return first.max_slots, first.max_rank
