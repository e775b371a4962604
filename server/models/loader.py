"""Load a local HF-format checkpoint (safetensors only) into the serving layout.

Model-agnostic: the family (registry.py) says which checkpoint tensors fill which weight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import safe_open

from loramux.kernels.attention.backend import AttentionBackend, select_attention_backend
from loramux.kernels.backend import LoraBackend
from loramux.kernels.buffers import LoraModuleBuffers, LoraModuleStack
from loramux.server.models.decoder import (
    HEAD_MODULE,
    LORA_GROUPS,
    DecoderModel,
    LayerLora,
    LayerWeights,
    ModelWeights,
)
from loramux.server.models.family import DecoderFamily
from loramux.server.models.registry import family_for
from loramux.server.models.spec import ModelSpec, ModelUnsupported, load_hf_config


class CheckpointError(ValueError):
    """The checkpoint directory is missing files or tensors, or holds only pickled weights."""


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} holds only pickled weights (*.bin / *.pt); loramux loads safetensors only"
        )
    raise CheckpointError(f"no *.safetensors weights in {model_dir}")


def _read_tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class _TensorTable:
    """Checkpoint tensors by name; every lookup names the checkpoint when a tensor is missing."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.model_dir = model_dir
        self.dtype = dtype
        self.device = device
        self.tensors = dict(_read_tensors(model_dir))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        return self.tensors.pop(name).to(device=self.device, dtype=dtype or self.dtype)

    def cat(self, names: list[str], dtype: torch.dtype | None = None) -> torch.Tensor:
        if len(names) == 1:
            return self.get(names[0], dtype)
        return torch.cat([self.get(n, dtype) for n in names], dim=0).contiguous()


def _load_weights(table: _TensorTable, family: DecoderFamily, spec: ModelSpec) -> ModelWeights:
    def load(field: str, names: list[str]) -> torch.Tensor:
        if not field.endswith("norm"):
            return table.cat(names)
        # Norm weights stay fp32 in every dtype (the norms run in fp32); Gemma's norms
        # multiply by (1 + w): the offset is folded in once, here.
        tensor = table.cat(names, torch.float32)
        return tensor + spec.norm_offset if spec.norm_offset else tensor

    layers = []
    layer_fields = {f.name for f in fields(LayerWeights)}
    for i in range(spec.num_layers):
        names = family.layer_tensors(spec, i)
        assert set(names) <= layer_fields, set(names) - layer_fields
        layers.append(LayerWeights(**{field: load(field, n) for field, n in names.items()}))
    names = family.model_tensors(spec)
    embed = table.get(names["embed"])
    lm_head = table.get(names["lm_head"]) if "lm_head" in names else embed
    final_norm = load("final_norm", [names["final_norm"]])
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)


def _lora_buffers(
    spec: ModelSpec, weights: ModelWeights, max_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[LayerLora], dict[str, LoraModuleBuffers]]:
    """(per layer: group -> slot buffers, outer module -> slot buffers). Every buffer that
    DoRA may target sees its base weight: the rows of its fused matmul it feeds."""
    # One stack per serving module: a slot of all layers is one strided region (adapter writes).
    stacks = {
        name: LoraModuleStack(spec.num_layers, max_slots, max_rank, *shape, dtype, device)
        for name, shape in spec.adapter_spec.module_shapes.items()
    }
    layers: list[LayerLora] = []
    for i, layer_weights in enumerate(weights.layers):
        layer = {group: tuple(stacks[name].layers[i] for name in names) for group, names in LORA_GROUPS.items()}
        for group, slices in layer.items():
            fused = getattr(layer_weights, group)  # [sum of slice widths, in_features]
            for buffers, rows in zip(slices, fused.split([b.out_features for b in slices])):
                buffers.base_weight = rows
        layers.append(layer)
    outer = {
        name: LoraModuleBuffers(max_slots, max_rank, *shape, dtype, device)
        for name, shape in spec.adapter_spec.outer_modules.items()
    }
    if HEAD_MODULE in outer:  # tied or not, lm_head's own weight [vocab, hidden]
        outer[HEAD_MODULE].base_weight = weights.lm_head
    return layers, outer


def load_model(
    model_dir: str | Path,
    backend: LoraBackend,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_model_len: int | None = None,
    max_lora_slots: int = 0,
    max_lora_rank: int = 0,
    attention_backend: AttentionBackend | None = None,
) -> DecoderModel:
    """Read config + safetensors from `model_dir` and build the serving model.

    max_lora_slots > 0 allocates that many stacked adapter slots of up to max_lora_rank.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir} has no config.json (is it a HF-format checkpoint?)")
    device = torch.device(device)
    config = load_hf_config(model_dir)
    family = family_for(config)
    spec = family.spec(config, max_model_len)
    table = _TensorTable(model_dir, dtype, device)
    weights = _load_weights(table, family, spec)
    leftovers = [n for n in table.tensors if not family.ignored_tensor(n)]
    if leftovers:
        raise ModelUnsupported(f"unexpected tensors in {model_dir}: {', '.join(sorted(leftovers)[:5])}")
    rope = family.rope_tables(config, spec)
    lora, outer_lora = (
        _lora_buffers(spec, weights, max_lora_slots, max_lora_rank, dtype, device) if max_lora_slots > 0 else (None, None)
    )
    attention = attention_backend or select_attention_backend(device)
    return DecoderModel(spec, weights, rope, lora, backend, attention, outer_lora)
