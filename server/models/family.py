"""What a model family declares, and the defaults most families share.

A family is one module (llama.py, qwen3.py, gemma.py, phi3.py) holding a subclass of
`DecoderFamily` that states:
  - `spec(config)`: sizes and structure (norms, windows, soft-capping, ...);
  - `adapter_spec(...)`: its LoRA target modules with (in, out) shapes, their PEFT paths,
    packed modules, what "all-linear" means, and the modules adapters may not target;
  - `layer_tensors` / `model_tensors`: which checkpoint tensors fill each weight
    (a list is concatenated along dim 0: that is how q/k/v become one fused matmul);
  - `rope_tables`: the rotary tables the layers use.
The loader (loader.py) and the adapter store only read these declarations.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from loramux.adapter_store.format import BaseModelSpec
from loramux.server.models.decoder import EMBED_MODULE, HEAD_MODULE
from loramux.server.models.layers import rope_table
from loramux.server.models.spec import ModelSpec, ModelUnsupported

# PEFT leaf name -> path inside a decoder layer, for Llama-shaped layers.
LLAMA_MODULE_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
# Modules outside the layers that adapters may target: PEFT leaf name -> full name.
OUTER_MODULE_PATHS = {EMBED_MODULE: "model.embed_tokens", HEAD_MODULE: "lm_head"}
FULL_ROPE = "full"  # key of the rotary table of full-attention layers
SLIDING_ROPE = "sliding"


def outer_module_spec(spec_sizes: dict) -> dict:
    """The BaseModelSpec fields of embed_tokens and lm_head LoRA (and DoRA), which every
    family's decoder serves the same way (decoder.py)."""
    vocab, hidden = spec_sizes["vocab_size"], spec_sizes["hidden_size"]
    return dict(
        outer_modules={EMBED_MODULE: (vocab, hidden), HEAD_MODULE: (hidden, vocab)},
        outer_paths=OUTER_MODULE_PATHS,
        embedding_modules=(EMBED_MODULE,),
        tied_modules={HEAD_MODULE: EMBED_MODULE} if spec_sizes["tie_word_embeddings"] else {},
        supports_dora=True,
    )


def serving_module_shapes(spec_sizes: dict) -> dict[str, tuple[int, int]]:
    """(in, out) of the seven serving modules every family's layers have."""
    h, i = spec_sizes["hidden_size"], spec_sizes["intermediate_size"]
    q, kv = spec_sizes["num_heads"] * spec_sizes["head_dim"], spec_sizes["num_kv_heads"] * spec_sizes["head_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


class DecoderFamily:
    model_types: tuple[str, ...] = ()

    # ------------------------------------------------------------------ structure
    def sizes(self, config: PretrainedConfig) -> dict:
        num_heads = config.num_attention_heads
        return dict(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            hidden_act=getattr(config, "hidden_act", None) or config.hidden_activation,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def layer_windows(self, config: PretrainedConfig) -> tuple[int | None, ...]:
        """Per layer: its sliding window, from `layer_types` where the config has them."""
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is None:
            return (window,) * config.num_hidden_layers
        return tuple(window if t == "sliding_attention" else None for t in types)

    def layer_rope(self, config: PretrainedConfig) -> tuple[str, ...]:
        return (FULL_ROPE,) * config.num_hidden_layers

    def biases(self, config: PretrainedConfig) -> dict:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(getattr(config, "mlp_bias", False)))

    def structure(self, config: PretrainedConfig, sizes: dict) -> dict:
        """The ModelSpec structure fields (q/k norms, soft-capping, ...); Llama's by default."""
        return dict(attn_scale=sizes["head_dim"] ** -0.5)

    def check(self, config: PretrainedConfig) -> None:
        """Refuse config features this family's code does not implement (one clear error)."""

    def spec(self, config: PretrainedConfig, max_model_len: int | None = None) -> ModelSpec:
        self.check(config)
        sizes = self.sizes(config)
        context = config.max_position_embeddings
        if max_model_len is not None:
            if max_model_len > context:
                raise ModelUnsupported(f"max_model_len {max_model_len} exceeds the model's context {context}")
            context = max_model_len
        return ModelSpec(
            model_type=config.model_type,
            **sizes,
            **self.biases(config),
            max_model_len=context,
            adapter_spec=self.adapter_spec(sizes),
            layer_windows=self.layer_windows(config),
            layer_rope=self.layer_rope(config),
            **self.structure(config, sizes),
        )

    # ------------------------------------------------------------------ LoRA targets
    def adapter_spec(self, sizes: dict) -> BaseModelSpec:
        return BaseModelSpec(
            num_layers=sizes["num_layers"],
            module_shapes=serving_module_shapes(sizes),
            module_paths=LLAMA_MODULE_PATHS,
            **outer_module_spec(sizes),
        )

    # ------------------------------------------------------------------ checkpoint mapping
    def layer_tensors(self, spec: ModelSpec, i: int) -> dict[str, list[str]]:
        """LayerWeights field -> checkpoint tensors (concatenated along dim 0)."""
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{m}_proj" for m in ("q", "k", "v")]
        mlp = [p + f"mlp.{m}_proj" for m in ("gate", "up")]
        names = {
            "input_norm": [p + "input_layernorm.weight"],
            "qkv": [n + ".weight" for n in attn],
            "o": [p + "self_attn.o_proj.weight"],
            "post_attention_norm": [p + "post_attention_layernorm.weight"],
            "gate_up": [n + ".weight" for n in mlp],
            "down": [p + "mlp.down_proj.weight"],
        }
        if spec.qkv_bias:
            names["qkv_bias"] = [n + ".bias" for n in attn]
        if spec.o_bias:
            names["o_bias"] = [p + "self_attn.o_proj.bias"]
        if spec.mlp_bias:
            names["gate_up_bias"] = [n + ".bias" for n in mlp]
            names["down_bias"] = [p + "mlp.down_proj.bias"]
        if spec.qk_norm:
            names["q_norm"] = [p + "self_attn.q_norm.weight"]
            names["k_norm"] = [p + "self_attn.k_norm.weight"]
        if spec.sandwich_norms:
            names["pre_feedforward_norm"] = [p + "pre_feedforward_layernorm.weight"]
            names["post_feedforward_norm"] = [p + "post_feedforward_layernorm.weight"]
        return names

    def model_tensors(self, spec: ModelSpec) -> dict[str, str]:
        """ModelWeights field -> checkpoint tensor (lm_head absent when tied)."""
        names = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight"}
        if not spec.tie_word_embeddings:
            names["lm_head"] = "lm_head.weight"
        return names

    def ignored_tensor(self, name: str) -> bool:
        """Checkpoint tensors that serving does not need (rotary caches, a tied lm_head)."""
        return "rotary_emb" in name or name == "lm_head.weight"

    # ------------------------------------------------------------------ rotary
    def rope_tables(self, config: PretrainedConfig, spec: ModelSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {FULL_ROPE: rope_table(config, spec.head_dim, spec.max_model_len)}
