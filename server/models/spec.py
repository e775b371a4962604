"""The shape of a Llama-family model, read once from its transformers config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loramux.adapter_store.format import BaseModelSpec

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# PEFT's leaf names of the projections every decoder layer has, in forward order.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ModelUnsupported(ValueError):
    """The checkpoint is not a Llama-family model loramux can serve (or uses a feature it lacks)."""


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    hidden_act: str
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2; Llama's attention_bias
    o_bias: bool  # Llama's attention_bias covers o_proj too
    mlp_bias: bool
    max_model_len: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def lora_module_shapes(self) -> dict[str, tuple[int, int]]:
        """PEFT module name -> (in_features, out_features)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def base_model_spec(self) -> BaseModelSpec:
        return BaseModelSpec(num_layers=self.num_layers, module_shapes=self.lora_module_shapes())


def load_hf_config(model_dir: str | Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(model_dir))


def model_spec_from_config(config: PretrainedConfig, max_model_len: int | None = None) -> ModelSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelUnsupported(
            f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    context = config.max_position_embeddings
    # Sliding-window attention equals full attention while the context fits the window,
    # so serve up to the window rather than implement the window.
    window = getattr(config, "sliding_window", None)
    if window and (model_type != "qwen2" or getattr(config, "use_sliding_window", False)):
        context = min(context, window)
    if max_model_len is not None:
        if max_model_len > context:
            raise ModelUnsupported(f"max_model_len {max_model_len} exceeds the model's context {context}")
        context = max_model_len
    return ModelSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act=config.hidden_act,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=attention_bias or model_type == "qwen2",
        o_bias=attention_bias and model_type == "llama",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        max_model_len=context,
    )


def rope_tables(config: PretrainedConfig, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: fp32 [max_model_len, head_dim], computed as transformers' Llama rotary does."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params["rope_theta"]
        dim = spec.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS and not rope_type.startswith("dynamic"):
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    else:
        raise ModelUnsupported(f"rope_type {rope_type!r} is not supported")
    positions = torch.arange(spec.max_model_len, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # [max_len, head_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    return emb.cos() * scaling, emb.sin() * scaling
