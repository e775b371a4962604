"""Qwen3: Llama's layers plus an RMSNorm over each head of q and k before the rotary."""

from __future__ import annotations

from transformers import PretrainedConfig

from loramux.server.models.family import DecoderFamily


class Qwen3Family(DecoderFamily):
    model_types = ("qwen3",)

    def structure(self, config: PretrainedConfig, sizes: dict) -> dict:
        return dict(attn_scale=sizes["head_dim"] ** -0.5, qk_norm=True)
