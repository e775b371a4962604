"""Load a local HF-format Llama-family checkpoint (safetensors only) into our layout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from loramux.kernels.backend import LoraBackend
from loramux.kernels.buffers import LoraModuleBuffers, LoraModuleStack
from loramux.server.models.llama import LayerLora, LayerWeights, LlamaModel, ModelWeights
from loramux.server.models.spec import ModelSpec, ModelUnsupported, load_hf_config, model_spec_from_config, rope_tables


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

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        return self.tensors.pop(name).to(device=self.device, dtype=self.dtype)

    def maybe(self, name: str, present: bool) -> torch.Tensor | None:
        return self.get(name) if present else None

    def cat(self, names: list[str], present: bool = True) -> torch.Tensor | None:
        if not present:
            return None
        return torch.cat([self.get(n) for n in names], dim=0).contiguous()


def _load_weights(table: _TensorTable, spec: ModelSpec) -> ModelWeights:
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{m}_proj" for m in ("q", "k", "v")]
        mlp = [p + f"mlp.{m}_proj" for m in ("gate", "up")]
        layers.append(
            LayerWeights(
                input_norm=table.get(p + "input_layernorm.weight"),
                qkv=table.cat([n + ".weight" for n in attn]),
                qkv_bias=table.cat([n + ".bias" for n in attn], spec.qkv_bias),
                o=table.get(p + "self_attn.o_proj.weight"),
                o_bias=table.maybe(p + "self_attn.o_proj.bias", spec.o_bias),
                post_attention_norm=table.get(p + "post_attention_layernorm.weight"),
                gate_up=table.cat([n + ".weight" for n in mlp]),
                gate_up_bias=table.cat([n + ".bias" for n in mlp], spec.mlp_bias),
                down=table.get(p + "mlp.down_proj.weight"),
                down_bias=table.maybe(p + "mlp.down_proj.bias", spec.mlp_bias),
            )
        )
    embed = table.get("model.embed_tokens.weight")
    if spec.tie_word_embeddings:
        table.tensors.pop("lm_head.weight", None)
        lm_head = embed
    else:
        lm_head = table.get("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=table.get("model.norm.weight"), lm_head=lm_head)


def _lora_buffers(
    spec: ModelSpec, max_slots: int, max_rank: int, dtype: torch.dtype, device: torch.device
) -> list[LayerLora]:
    # One stack per projection: a slot of all layers is one strided region (adapter writes).
    stacks = {
        name: LoraModuleStack(spec.num_layers, max_slots, max_rank, *shape, dtype, device)
        for name, shape in spec.lora_module_shapes().items()
    }

    def make(name: str, layer: int) -> LoraModuleBuffers:
        return stacks[name].layers[layer]

    return [
        LayerLora(
            qkv=(make("q_proj", i), make("k_proj", i), make("v_proj", i)),
            o=(make("o_proj", i),),
            gate_up=(make("gate_proj", i), make("up_proj", i)),
            down=(make("down_proj", i),),
        )
        for i in range(spec.num_layers)
    ]


def load_model(
    model_dir: str | Path,
    backend: LoraBackend,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_model_len: int | None = None,
    max_lora_slots: int = 0,
    max_lora_rank: int = 0,
) -> LlamaModel:
    """Read config + safetensors from `model_dir` and build the serving model.

    max_lora_slots > 0 allocates that many stacked adapter slots of up to max_lora_rank.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir} has no config.json (is it a HF-format checkpoint?)")
    device = torch.device(device)
    config = load_hf_config(model_dir)
    spec = model_spec_from_config(config, max_model_len)
    table = _TensorTable(model_dir, dtype, device)
    weights = _load_weights(table, spec)
    leftovers = [n for n in table.tensors if "rotary_emb" not in n]
    if leftovers:
        raise ModelUnsupported(f"unexpected tensors in {model_dir}: {', '.join(sorted(leftovers)[:5])}")
    cos, sin = rope_tables(config, spec)
    lora = _lora_buffers(spec, max_lora_slots, max_lora_rank, dtype, device) if max_lora_slots > 0 else None
    return LlamaModel(spec, weights, cos, sin, lora, backend)
