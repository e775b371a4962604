"""The shape and structure of a decoder model, as its family reads it from the HF config.

One frozen `ModelSpec` covers every family: sizes, plus the structural switches the
families differ in (q/k norms, Gemma's norm offset and sandwich norms, soft-capping,
per-layer sliding windows and rotary tables). The family module (llama.py, qwen3.py,
gemma.py, phi3.py) fills it in; the decoder (decoder.py) and the runner read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from loramux.adapter_store.format import BaseModelSpec


class ModelUnsupported(ValueError):
    """The checkpoint's model_type, or a feature of its config, is one loramux does not serve."""


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
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_model_len: int
    # What adapters are checked against (the family declares modules, shapes, paths).
    adapter_spec: BaseModelSpec
    # Per layer: the sliding window (None = full attention) and the key of its rotary table.
    layer_windows: tuple[int | None, ...]
    layer_rope: tuple[str, ...]
    attn_scale: float  # multiplies q @ k.T
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before rotary
    # Gemma 2/3: norms after attention and around the MLP (input, post-attention,
    # pre-feedforward, post-feedforward); otherwise Llama's input + post-attention.
    sandwich_norms: bool = False
    norm_offset: float = 0.0  # Gemma: the norm multiplies by (offset + weight)
    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden_size)
    attn_softcap: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def windows(self) -> tuple[int, ...]:
        """The distinct sliding windows of the layers (metadata builds one mask each)."""
        return tuple(sorted({w for w in self.layer_windows if w is not None}))

    def base_model_spec(self) -> BaseModelSpec:
        return self.adapter_spec


def load_hf_config(model_dir: str | Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError) as exc:  # an unknown model_type fails inside transformers
        raise ModelUnsupported(f"cannot read {model_dir}/config.json: {exc}") from None
