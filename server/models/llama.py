"""Llama-shaped families: Llama (incl. 3.x rope scaling), Mistral (sliding window), Qwen2.

The defaults of `DecoderFamily` are Llama's; the differences are a few lines each.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from loramux.server.models.family import DecoderFamily


class LlamaFamily(DecoderFamily):
    model_types = ("llama",)


class MistralFamily(DecoderFamily):
    """Mistral: Llama's layers; `sliding_window` (when set) applies to every layer."""

    model_types = ("mistral",)

    def layer_windows(self, config: PretrainedConfig) -> tuple[int | None, ...]:
        return (getattr(config, "sliding_window", None),) * config.num_hidden_layers

    def biases(self, config: PretrainedConfig) -> dict:
        return dict(qkv_bias=False, o_bias=False, mlp_bias=False)


class Qwen2Family(DecoderFamily):
    """Qwen2: biases on q/k/v only; sliding layers from `layer_types` when enabled."""

    model_types = ("qwen2",)

    def biases(self, config: PretrainedConfig) -> dict:
        return dict(qkv_bias=True, o_bias=False, mlp_bias=False)
