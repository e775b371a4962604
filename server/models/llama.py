"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat batch of tokens from many sequences.

Every adapted projection adds its per-token LoRA delta with one backend call; q/k/v and
gate/up are fused into one matmul each, and their LoRA deltas go into the matching
column slices of the fused output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from loramux.kernels.backend import LoraBackend
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.logits import lm_head_logits
from loramux.kernels.metadata import LoraBatchInfo
from loramux.server.models.spec import ModelSpec
from loramux.server.runner.attention import AttentionMetadata, paged_attention


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None  # [q_size + 2 * kv_size]
    o: torch.Tensor  # [hidden, q_size]
    o_bias: torch.Tensor | None  # [hidden]
    post_attention_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    gate_up_bias: torch.Tensor | None  # [2 * intermediate]
    down: torch.Tensor  # [hidden, intermediate]
    down_bias: torch.Tensor | None  # [hidden]


@dataclass
class LayerLora:
    """The layer's stacked per-slot LoRA buffers, grouped as the fused projections use them."""

    qkv: tuple[LoraModuleBuffers, LoraModuleBuffers, LoraModuleBuffers]
    o: tuple[LoraModuleBuffers]
    gate_up: tuple[LoraModuleBuffers, LoraModuleBuffers]
    down: tuple[LoraModuleBuffers]

    def by_module(self) -> dict[str, LoraModuleBuffers]:
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return dict(zip(names, (*self.qkv, *self.o, *self.gate_up, *self.down)))


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as embed when tied


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    lora: LoraBatchInfo
    attention: AttentionMetadata


class LlamaModel:
    def __init__(
        self,
        spec: ModelSpec,
        weights: ModelWeights,
        rope_cos: torch.Tensor,  # fp32 [max_model_len, head_dim]
        rope_sin: torch.Tensor,
        lora: list[LayerLora] | None,
        backend: LoraBackend,
    ) -> None:
        self.spec = spec
        self.weights = weights
        dtype = weights.embed.dtype
        self.rope_cos = rope_cos.to(device=weights.embed.device, dtype=dtype)
        self.rope_sin = rope_sin.to(device=weights.embed.device, dtype=dtype)
        self.lora = lora
        self.backend = backend
        self.act = ACT2FN[spec.hidden_act]
        self.scale = spec.head_dim**-0.5

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def lora_buffers(self) -> dict[tuple[int, str], LoraModuleBuffers]:
        """(layer index, PEFT module name) -> that module's slot buffers (for the adapter store)."""
        if self.lora is None:
            return {}
        return {
            (i, name): buffers
            for i, layer in enumerate(self.lora)
            for name, buffers in layer.by_module().items()
        }

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: K, V caches
    ) -> torch.Tensor:  # [num_tokens, hidden], after the final norm
        spec = self.spec
        hidden = F.embedding(batch.input_ids, self.weights.embed)  # [T, hidden]
        cos = self.rope_cos[batch.positions].unsqueeze(1)  # [T, 1, head_dim]
        sin = self.rope_sin[batch.positions].unsqueeze(1)
        use_lora = self.lora is not None and batch.lora.has_adapters
        for index, layer in enumerate(self.weights.layers):
            lora = self.lora[index] if use_lora else None
            hidden = self._layer(hidden, layer, lora, batch, kv_caches[index], cos, sin)
        return F.rms_norm(hidden, (spec.hidden_size,), self.weights.final_norm, spec.rms_norm_eps)

    def _layer(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        w: LayerWeights,
        lora: LayerLora | None,
        batch: ForwardBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        spec = self.spec
        num_tokens = hidden.shape[0]
        x = F.rms_norm(hidden, (spec.hidden_size,), w.input_norm, spec.rms_norm_eps)
        qkv = F.linear(x, w.qkv, w.qkv_bias)  # [T, q_size + 2 * kv_size]
        if lora is not None:
            self.backend.add_lora(qkv, x, lora.qkv, batch.lora)
        q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = _rotate(q.view(num_tokens, spec.num_heads, spec.head_dim), cos, sin)
        k = _rotate(k.view(num_tokens, spec.num_kv_heads, spec.head_dim), cos, sin)
        v = v.reshape(num_tokens, spec.num_kv_heads, spec.head_dim)
        attn = paged_attention(q, k, v, kv_cache[0], kv_cache[1], batch.attention, self.scale)
        out = F.linear(attn, w.o, w.o_bias)  # [T, hidden]
        if lora is not None:
            self.backend.add_lora(out, attn, lora.o, batch.lora)
        hidden = hidden + out

        x = F.rms_norm(hidden, (spec.hidden_size,), w.post_attention_norm, spec.rms_norm_eps)
        gate_up = F.linear(x, w.gate_up, w.gate_up_bias)  # [T, 2 * intermediate]
        if lora is not None:
            self.backend.add_lora(gate_up, x, lora.gate_up, batch.lora)
        gate, up = gate_up.split(spec.intermediate_size, dim=-1)
        mid = self.act(gate) * up  # [T, intermediate]
        out = F.linear(mid, w.down, w.down_bias)  # [T, hidden]
        if lora is not None:
            self.backend.add_lora(out, mid, lora.down, batch.lora)
        return hidden + out

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] final-normed rows -> fp32 logits [n, vocab]."""
        return lm_head_logits(hidden, self.weights.lm_head)  # bf16: its top candidates exact


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' rotate_half convention. x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
