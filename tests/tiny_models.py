"""Tiny random Llama-family checkpoints and a minimal static driver for runner tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen2Config, Qwen3Config

from loramux.scheduler.output import SchedulerOutput
from loramux.scheduler.request import Request

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_config(kind: str = "llama", **overrides):
    values = {**TINY, **overrides}
    if kind == "llama":
        return LlamaConfig(**values)
    if kind == "llama-tied":
        return LlamaConfig(**{**values, "tie_word_embeddings": True})
    if kind == "llama-bias":
        return LlamaConfig(**{**values, "attention_bias": True, "mlp_bias": True})
    if kind == "mistral":
        return MistralConfig(**{**values, "sliding_window": None})
    if kind == "qwen2":
        return Qwen2Config(**{**values, "tie_word_embeddings": False})
    if kind == "llama3":  # Llama 3.x: rope scaling "llama3" (positions past 16 are "long")
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        }
        return LlamaConfig(**{**values, "rope_parameters": rope})
    if kind == "mistral-window":  # a window of 4: every prompt and decode here reaches past it
        return MistralConfig(**{**values, "sliding_window": 4})
    if kind == "qwen3":  # q/k norms, explicit head_dim (not hidden / heads)
        return Qwen3Config(**{**values, "head_dim": 24, "tie_word_embeddings": False})
    if kind in ("gemma2", "gemma3"):
        # Alternating sliding (window 4) and full layers; the caps bite at these scales.
        gemma = dict(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            hidden_activation="gelu_pytorch_tanh",
        )
        if kind == "gemma2":
            return Gemma2Config(**{**values, **gemma, "attn_logit_softcapping": 0.5, "final_logit_softcapping": 2.0})
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        return Gemma3TextConfig(**{**values, **gemma, "rope_parameters": rope, "final_logit_softcapping": 3.0})
    if kind == "phi3":  # fused qkv_proj / gate_up_proj; LongRoPE (short factors below 64)
        half = values["hidden_size"] // values["num_attention_heads"] // 2
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.3 * i for i in range(half)],
            "original_max_position_embeddings": 64,
        }
        return Phi3Config(**{**values, "rope_parameters": rope, "original_max_position_embeddings": 64, "tie_word_embeddings": False})
    raise ValueError(kind)


# Every family (and family feature) the runner-vs-transformers tests and `make golden` cover.
FAMILY_KINDS = ["llama", "llama3", "mistral-window", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]


def save_tiny_model(directory: Path, kind: str = "llama", seed: int = 0, **overrides):
    """Write a random tiny checkpoint (safetensors + config) and return the HF model (fp32, eval)."""
    torch.manual_seed(seed)
    config = tiny_config(kind, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is small; widen it so that logits differ visibly between positions.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08)
            else:  # norms too (around their init: 1, or 0 where the norm adds 1)
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(directory)
    return model


def generate_static(runner, requests: list[Request], num_steps: int) -> dict[str, list[torch.Tensor]]:
    """Greedy-decode all `requests` together for `num_steps` tokens on a ModelRunner.

    For runner tests only: one prefill step for everyone, then decodes; blocks come from a
    trivial allocator and no scheduler policy is involved. Returns each request's logits
    (fp32 [vocab]) at every step; tokens are appended to the requests.
    """
    block_size = runner.block_size
    next_block = 0
    for request in requests:
        needed = -(-(request.num_tokens + num_steps) // block_size)
        request.block_ids = list(range(next_block, next_block + needed))
        next_block += needed
    logits_by_request: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    for _ in range(num_steps):
        num_tokens = [r.num_tokens - r.num_computed_tokens for r in requests]
        step = runner.prepare(
            SchedulerOutput(
                scheduled_requests=requests,
                num_scheduled_tokens=num_tokens,
                total_num_scheduled_tokens=sum(num_tokens),
            )
        )
        hidden = runner.forward(step)
        logits = runner.sample_logits(step, hidden)
        for row, index in enumerate(step.sample_indices):
            request = step.requests[index]
            logits_by_request[request.request_id].append(logits[row])
            request.num_computed_tokens += step.num_tokens[index]
            request.append_output(int(logits[row].argmax()))
    return logits_by_request
