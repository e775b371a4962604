"""Shared blocks of the decoder families: norms, rotary tables, the LoRA-aware linear."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loramux.kernels.backend import LoraBackend
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.dora import apply_dora
from loramux.kernels.metadata import LoraBatchInfo
from loramux.server.models.spec import ModelUnsupported


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x: [..., dim]; weight fp32 [dim] already holds any family offset (Gemma's 1 + w).

    Computed in fp32 whatever x's dtype (a bf16 norm loses the small components a bf16
    GEMM then amplifies); the result is fp32, or `out_dtype` for a GEMM input."""
    y = F.rms_norm(x.float(), (x.shape[-1],), weight, eps)
    return y if out_dtype is None else y.to(out_dtype)


def lora_linear(
    x: torch.Tensor,  # [T, in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None,  # [out_features]
    lora: Sequence[LoraModuleBuffers] | None,  # output slices of this projection, or None
    backend: LoraBackend,
    info: LoraBatchInfo,
) -> torch.Tensor:  # [T, out_features]
    """y = x @ W.T + b, plus each token's adapter delta into its column slices (rescaled
    per token for DoRA adapters: loramux_kernels/dora.py)."""
    y = F.linear(x, weight, bias)
    if lora is not None:
        backend.add_lora(y, x, lora, info)
        apply_dora(y, bias, lora, info)
    return y


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, transformers' rotate_half convention. x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_parameters(config: PretrainedConfig, layer_type: str | None = None) -> dict:
    """The config's rope parameters, or those of one layer type (Gemma 3 keeps one per type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    return params


def rope_table(
    config: PretrainedConfig,
    head_dim: int,
    max_len: int,
    layer_type: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: fp32 [max_len, head_dim] as transformers' rotary embedding computes them.

    LongRoPE (Phi-3) switches from its short to its long factors by position here: a
    position past original_max_position_embeddings uses the long factors. (transformers
    switches a whole sequence at once when it grows past that length; both agree below it.)
    """
    params = rope_parameters(config, layer_type)
    rope_type = params.get("rope_type", "default")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelUnsupported("partial_rotary_factor != 1 (partial rotary embeddings) is not supported")
    kwargs = {"layer_type": layer_type} if layer_type is not None and layer_type in (
        getattr(config, "rope_parameters", None) or {}
    ) else {}
    positions = torch.arange(max_len, dtype=torch.float32)
    if rope_type == "default":
        base = params["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = positions[:, None] * inv_freq[None, :]  # [max_len, head_dim / 2]
        scaling = 1.0
    elif rope_type == "longrope":
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", config.max_position_embeddings
        )
        short, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", **kwargs)
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=original + 1, **kwargs)
        inv_freq = torch.where(positions[:, None] < original, short.float()[None, :], long.float()[None, :])
        freqs = positions[:, None] * inv_freq  # [max_len, head_dim / 2]
    elif rope_type in ROPE_INIT_FUNCTIONS and not rope_type.startswith("dynamic"):
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
        freqs = positions[:, None] * inv_freq.float()[None, :]
    else:
        raise ModelUnsupported(f"rope_type {rope_type!r} is not supported")
    emb = torch.cat((freqs, freqs), dim=-1)  # [max_len, head_dim]
    return emb.cos() * scaling, emb.sin() * scaling
