"""Phi-3: Llama's decoder with fused checkpoint projections and LongRoPE.

The checkpoint stores q/k/v as one `self_attn.qkv_proj` and gate/up as one
`mlp.gate_up_proj`: they load straight into the decoder's fused matmuls. For adapters,
those are packed modules over the serving modules q/k/v and gate/up: an adapter on the
fused module (what PEFT makes on Phi-3, and what "all-linear" means here) is served as
its parts; an adapter on the parts (q_proj, ..., as made on an unfused copy) loads as is.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from loramux.adapter_store.format import BaseModelSpec
from loramux.server.models.family import LLAMA_MODULE_PATHS, DecoderFamily, outer_module_spec, serving_module_shapes
from loramux.server.models.spec import ModelSpec

PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class Phi3Family(DecoderFamily):
    model_types = ("phi3",)

    def biases(self, config: PretrainedConfig) -> dict:
        return dict(qkv_bias=False, o_bias=False, mlp_bias=False)

    def adapter_spec(self, sizes: dict) -> BaseModelSpec:
        return BaseModelSpec(
            num_layers=sizes["num_layers"],
            module_shapes=serving_module_shapes(sizes),
            module_paths={**LLAMA_MODULE_PATHS, "qkv_proj": "self_attn.qkv_proj", "gate_up_proj": "mlp.gate_up_proj"},
            packed_modules=PACKED_MODULES,
            all_linear=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
            **outer_module_spec(sizes),
        )

    def layer_tensors(self, spec: ModelSpec, i: int) -> dict[str, list[str]]:
        p = f"model.layers.{i}."
        return {
            "input_norm": [p + "input_layernorm.weight"],
            "qkv": [p + "self_attn.qkv_proj.weight"],
            "o": [p + "self_attn.o_proj.weight"],
            "post_attention_norm": [p + "post_attention_layernorm.weight"],
            "gate_up": [p + "mlp.gate_up_proj.weight"],
            "down": [p + "mlp.down_proj.weight"],
        }
