"""Gemma 2 and Gemma 3 (text): Llama's projections in a different decoder.

Differences from Llama, all declared here:
  - norms multiply by (1 + w) (norm_offset 1, folded into the weights at load);
  - four norms per layer: input, post-attention, pre- and post-feedforward (sandwich);
  - embeddings times sqrt(hidden_size); gelu-tanh MLP (`hidden_activation`);
  - attention scale query_pre_attn_scalar ** -0.5; sliding-window layers from layer_types;
  - Gemma 2: soft-capping of attention scores and of the final logits;
  - Gemma 3: q/k norms, and a rotary table per layer type (local base for sliding layers).
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from loramux.server.models.family import FULL_ROPE, SLIDING_ROPE, DecoderFamily
from loramux.server.models.layers import rope_table
from loramux.server.models.spec import ModelSpec


class Gemma2Family(DecoderFamily):
    model_types = ("gemma2",)

    def sizes(self, config: PretrainedConfig) -> dict:
        # Gemma's MLP activation is `hidden_activation` (`hidden_act` is a legacy field).
        return {**super().sizes(config), "hidden_act": config.hidden_activation}

    def structure(self, config: PretrainedConfig, sizes: dict) -> dict:
        return dict(
            attn_scale=config.query_pre_attn_scalar**-0.5,
            sandwich_norms=True,
            norm_offset=1.0,
            embed_scale=config.hidden_size**0.5,
            attn_softcap=getattr(config, "attn_logit_softcapping", None),
            final_softcap=getattr(config, "final_logit_softcapping", None),
        )

    def biases(self, config: PretrainedConfig) -> dict:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=False)


class Gemma3TextFamily(Gemma2Family):
    model_types = ("gemma3_text",)

    def structure(self, config: PretrainedConfig, sizes: dict) -> dict:
        return {**super().structure(config, sizes), "qk_norm": True}

    def layer_rope(self, config: PretrainedConfig) -> tuple[str, ...]:
        return tuple(SLIDING_ROPE if t == "sliding_attention" else FULL_ROPE for t in config.layer_types)

    def rope_tables(self, config: PretrainedConfig, spec: ModelSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {
            FULL_ROPE: rope_table(config, spec.head_dim, spec.max_model_len, "full_attention"),
            SLIDING_ROPE: rope_table(config, spec.head_dim, spec.max_model_len, "sliding_attention"),
        }
