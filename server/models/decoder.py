"""The decoder every family serves, over a flat batch of tokens from many sequences.

Its structure comes from the family's `ModelSpec` (q/k norms, sandwich norms, windows,
soft-capping, ...). q/k/v and gate/up are fused into one matmul each, and their LoRA
deltas go into the matching column slices of the fused output (one backend call each).

Mixed precision, as serving stacks run bf16: the GEMMs, LoRA and attention run in the
weights' dtype (bf16 or fp32), while the residual stream, the norms and the rotary
embedding stay fp32 (a bf16 residual rounds every layer's sum to 8 mantissa bits and
flips near-tie predictions). Each GEMM input is cast once, from the fp32 norm output.
In fp32 every cast is a no-op and the arithmetic is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from loramux.adapter_store.format import MODEL_LEVEL
from loramux.kernels.attention.backend import AttentionBackend, AttentionLayer
from loramux.kernels.backend import LoraBackend
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.dora import apply_dora
from loramux.kernels.embedding_lora import add_embedding_lora, step_adapts
from loramux.kernels.logits import lm_head_logits
from loramux.kernels.metadata import LoraBatchInfo
from loramux.server.models.layers import lora_linear, rms_norm, rotate
from loramux.server.models.protocol import ForwardBatch
from loramux.server.models.spec import ModelSpec

# The serving modules of every layer, grouped as the fused projections use them.
LORA_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
# The modules outside the layers that adapters may target (PEFT leaf names); their buffers
# sit at layer MODEL_LEVEL in lora_buffers().
EMBED_MODULE = "embed_tokens"
HEAD_MODULE = "lm_head"


@dataclass
class LayerWeights:
    # Norm weights are fp32 in every dtype; the projections are in the model's dtype.
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    o: torch.Tensor  # [hidden, q_size]
    post_attention_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]
    qkv_bias: torch.Tensor | None = None  # [q_size + 2 * kv_size]
    o_bias: torch.Tensor | None = None  # [hidden]
    gate_up_bias: torch.Tensor | None = None  # [2 * intermediate]
    down_bias: torch.Tensor | None = None  # [hidden]
    q_norm: torch.Tensor | None = None  # [head_dim] (qk_norm)
    k_norm: torch.Tensor | None = None  # [head_dim]
    pre_feedforward_norm: torch.Tensor | None = None  # [hidden] (sandwich_norms)
    post_feedforward_norm: torch.Tensor | None = None  # [hidden]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # fp32 [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the same tensor as embed when tied


# One layer's LoRA buffers: group name (LORA_GROUPS) -> its slices in output order.
LayerLora = dict[str, tuple[LoraModuleBuffers, ...]]


class DecoderModel:
    def __init__(
        self,
        spec: ModelSpec,
        weights: ModelWeights,
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],  # key -> fp32 cos, sin [max_model_len, head_dim]
        lora: list[LayerLora] | None,
        lora_backend: LoraBackend,
        attention_backend: AttentionBackend,
        outer_lora: dict[str, LoraModuleBuffers] | None = None,  # EMBED_MODULE / HEAD_MODULE
    ) -> None:
        self.spec = spec
        self.weights = weights
        device = weights.embed.device
        # The rotary tables stay fp32: positions past a few hundred lose their phase in bf16.
        self.rope = {
            key: (cos.to(device, torch.float32), sin.to(device, torch.float32)) for key, (cos, sin) in rope.items()
        }
        self.lora = lora
        self.outer_lora = outer_lora or {}
        self.embed_lora = self.outer_lora.get(EMBED_MODULE)
        # One tuple made once: backends key per-projection tables on the slices they get.
        self.head_lora = (self.outer_lora[HEAD_MODULE],) if HEAD_MODULE in self.outer_lora else None
        self.lora_backend = lora_backend
        self.attention_backend = attention_backend
        self.act = ACT2FN[spec.hidden_act]
        self.attention_layers = [
            AttentionLayer(scale=spec.attn_scale, window=window, softcap=spec.attn_softcap)
            for window in spec.layer_windows
        ]

    @property
    def device(self) -> torch.device:
        return self.weights.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def lora_buffers(self) -> dict[tuple[int, str], LoraModuleBuffers]:
        if self.lora is None:
            return {}
        layers = {
            (i, name): buffers
            for i, layer in enumerate(self.lora)
            for group, slices in layer.items()
            for name, buffers in zip(LORA_GROUPS[group], slices)
        }
        return {**layers, **{(MODEL_LEVEL, name): buffers for name, buffers in self.outer_lora.items()}}

    @torch.inference_mode()
    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: K, V caches
    ) -> torch.Tensor:  # fp32 [num_tokens, hidden], after the final norm
        spec = self.spec
        hidden = F.embedding(batch.input_ids, self.weights.embed)  # [T, hidden] in the serving dtype
        embed_lora = self.embed_lora
        if embed_lora is not None and batch.lora.has_adapters and step_adapts((embed_lora,), batch.lora):
            add_embedding_lora(hidden, batch.input_ids, embed_lora, batch.lora)
        hidden = hidden.float()  # fp32 [T, hidden]: the residual stream
        if spec.embed_scale is not None:  # scales the adapter's delta too, as peft does
            hidden = hidden * torch.tensor(spec.embed_scale, dtype=hidden.dtype)
        # Each rotary table gathered once per step: [T, 1, head_dim]
        rope = {
            key: (cos[batch.positions].unsqueeze(1), sin[batch.positions].unsqueeze(1))
            for key, (cos, sin) in self.rope.items()
        }
        use_lora = self.lora is not None and batch.lora.has_adapters
        for index, layer in enumerate(self.weights.layers):
            lora = self.lora[index] if use_lora else None
            cos, sin = rope[spec.layer_rope[index]]
            hidden = self._layer(index, hidden, layer, lora, batch, kv_caches[index], cos, sin)
        return rms_norm(hidden, self.weights.final_norm, spec.rms_norm_eps)

    def _layer(
        self,
        index: int,
        hidden: torch.Tensor,  # fp32 [T, hidden]
        w: LayerWeights,
        lora: LayerLora | None,
        batch: ForwardBatch,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        cos: torch.Tensor,  # fp32 [T, 1, head_dim]
        sin: torch.Tensor,
    ) -> torch.Tensor:  # fp32 [T, hidden]
        spec, backend, info = self.spec, self.lora_backend, batch.lora
        eps = spec.rms_norm_eps
        num_tokens, dtype = hidden.shape[0], self.dtype
        x = rms_norm(hidden, w.input_norm, eps, dtype)  # [T, hidden] in the GEMM dtype
        qkv = lora_linear(x, w.qkv, w.qkv_bias, lora and lora["qkv"], backend, info)  # [T, q + 2 kv]
        q, k, v = qkv.split([spec.q_size, spec.kv_size, spec.kv_size], dim=-1)
        q = q.view(num_tokens, spec.num_heads, spec.head_dim)
        k = k.view(num_tokens, spec.num_kv_heads, spec.head_dim)
        if w.q_norm is not None:
            q, k = rms_norm(q, w.q_norm, eps), rms_norm(k, w.k_norm, eps)  # fp32
        q, k = rotate(q.float(), cos, sin).to(dtype), rotate(k.float(), cos, sin).to(dtype)
        v = v.reshape(num_tokens, spec.num_kv_heads, spec.head_dim)
        attn = self.attention_backend.forward(
            q, k, v, kv_cache[0], kv_cache[1], batch.attention, self.attention_layers[index]
        )  # [T, q_size]
        out = lora_linear(attn, w.o, w.o_bias, lora and lora["o"], backend, info)  # [T, hidden]
        if spec.sandwich_norms:
            out = rms_norm(out, w.post_attention_norm, eps)
            hidden = hidden + out  # fp32 residual add
            x = rms_norm(hidden, w.pre_feedforward_norm, eps, dtype)
        else:
            hidden = hidden + out
            x = rms_norm(hidden, w.post_attention_norm, eps, dtype)
        gate_up = lora_linear(x, w.gate_up, w.gate_up_bias, lora and lora["gate_up"], backend, info)
        gate, up = gate_up.split(spec.intermediate_size, dim=-1)
        mid = self.act(gate) * up  # [T, intermediate]
        out = lora_linear(mid, w.down, w.down_bias, lora and lora["down"], backend, info)  # [T, hidden]
        if spec.sandwich_norms:
            out = rms_norm(out, w.post_feedforward_norm, eps)
        return hidden + out

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, lora: LoraBatchInfo | None = None) -> torch.Tensor:
        """fp32 [n, hidden] final-normed rows -> fp32 logits [n, vocab].

        `lora` maps the rows to adapter slots for lm_head adapters (None: base logits). Only
        when one of those slots adapts lm_head is the backend planned for these rows (after
        the step's forward, which no longer needs its own plan)."""
        logits = lm_head_logits(hidden, self.weights.lm_head)  # bf16: its top candidates exact
        head = self.head_lora
        if lora is not None and head is not None and lora.has_adapters and step_adapts(head, lora):
            dtype = self.weights.lm_head.dtype  # the LoRA backend runs in the serving dtype
            delta = torch.zeros(logits.shape, dtype=dtype, device=hidden.device)  # [n, vocab]
            self.lora_backend.prepare(lora)
            self.lora_backend.add_lora(delta, hidden.to(dtype), head, lora)
            logits += delta
            apply_dora(logits, None, head, lora)
        cap = self.spec.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
