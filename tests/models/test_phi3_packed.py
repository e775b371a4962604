"""Phi-3's packed modules: an adapter on the fused qkv_proj / gate_up_proj and the same
adapter written on the parts (q/k/v_proj, gate/up_proj) both match peft on the fused one;
LongRoPE switches to its long factors past original_max_position_embeddings."""

from __future__ import annotations

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import load_adapter
from loramux.kernels.backend import select_backend
from loramux.scheduler.request import BASE_SLOT, Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.models.layers import rope_table
from loramux.server.models.loader import load_model
from loramux.server.runner.model_runner import ModelRunner
from tests.models.test_runner_vs_transformers import NUM_STEPS, PROMPTS, reference_logits
from tests.peft_adapters import AdapterRecipe, make_peft_adapter
from tests.tiny_models import generate_static, save_tiny_model, tiny_config

PART_RANK = 4
PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
BLOCKS = {"self_attn": "qkv_proj", "mlp": "gate_up_proj"}


def block_diagonal_fused_adapter(hf, directory):
    """A peft adapter on the fused modules whose lora_B is block diagonal: part k's rows
    read only part k's PART_RANK columns, so it is exactly one small adapter per part."""
    recipe = AdapterRecipe(
        "fused",
        r=3 * PART_RANK,
        target_modules=["qkv_proj", "gate_up_proj"],
        rank_pattern={"gate_up_proj": 2 * PART_RANK},
        lora_alpha=24.0,  # scaling 2 = 8 / PART_RANK
        alpha_pattern={"gate_up_proj": 16.0},
        seed=7,
        b_std=0.1,
    )
    path = make_peft_adapter(hf, recipe, directory)
    config = tiny_config("phi3")
    head_dim = config.hidden_size // config.num_attention_heads
    widths = {
        "qkv_proj": [config.num_attention_heads * head_dim] + [config.num_key_value_heads * head_dim] * 2,
        "gate_up_proj": [config.intermediate_size] * 2,
    }
    tensors = load_file(path / "adapter_model.safetensors")
    for key, value in tensors.items():
        fused = next((f for f in PARTS if f".{f}.lora_B" in key), None)
        if fused is None:
            continue
        mask = torch.zeros_like(value, dtype=torch.bool)
        row = 0
        for k, width in enumerate(widths[fused]):
            mask[row : row + width, k * PART_RANK : (k + 1) * PART_RANK] = True
            row += width
        tensors[key] = value * mask
    save_file(tensors, path / "adapter_model.safetensors")
    return path, tensors, widths


def parts_adapter(fused_tensors, widths, directory):
    """The same adapter written on the parts, as a rank-PART_RANK adapter."""
    directory.mkdir()
    tensors = {}
    for key, value in fused_tensors.items():
        fused = next(f for f in PARTS if f".{f}." in key)
        for k, part in enumerate(PARTS[fused]):
            cols = slice(k * PART_RANK, (k + 1) * PART_RANK)
            part_key = key.replace(f".{fused}.", f".{part}.")
            if ".lora_A." in key:
                tensors[part_key] = value[cols].contiguous()
            else:
                start = sum(widths[fused][:k])
                tensors[part_key] = value[start : start + widths[fused][k], cols].contiguous()
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": PART_RANK, "lora_alpha": 8.0, "target_modules": sorted(p for ps in PARTS.values() for p in ps)}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_fused_and_parts_adapters_match_peft(tmp_path):
    hf = save_tiny_model(tmp_path / "base", "phi3")
    fused_dir, fused_tensors, widths = block_diagonal_fused_adapter(hf, tmp_path / "adapters")
    parts_dir = parts_adapter(fused_tensors, widths, tmp_path / "adapters" / "parts")
    backend = select_backend(torch.device("cpu"), torch.float32, name="torch")
    model = load_model(tmp_path / "base", backend, max_lora_slots=3, max_lora_rank=16)
    spec = model.spec.base_model_spec()
    fused = load_adapter("fused", fused_dir, spec, max_rank=16)
    parts = load_adapter("parts", parts_dir, spec, max_rank=16)
    assert fused.max_rank == 3 * PART_RANK and parts.max_rank == PART_RANK
    write_adapter_to_slot(model.lora_buffers(), 1, fused)
    write_adapter_to_slot(model.lora_buffers(), 2, parts)
    runner = ModelRunner(model, num_kv_blocks=128, block_size=4)
    plan = [("fused", 1), ("parts", 2), (None, BASE_SLOT)]
    requests = [
        Request(f"r{i}-{j}", list(p), SamplingParams(max_tokens=NUM_STEPS, temperature=0), adapter_id=name, adapter_slot=slot)
        for i, (name, slot) in enumerate(plan)
        for j, p in enumerate(PROMPTS[:2])
    ]
    ours = generate_static(runner, requests, NUM_STEPS)
    peft = PeftModel.from_pretrained(hf, fused_dir, adapter_name="fused").eval()
    outputs = {}
    for request in requests:
        if request.adapter_id is None:
            with peft.disable_adapter():
                ref = reference_logits(peft, request.all_token_ids, request.num_prompt_tokens)
        else:
            ref = reference_logits(peft, request.all_token_ids, request.num_prompt_tokens)
        torch.testing.assert_close(torch.stack(ours[request.request_id]), ref, atol=1e-4, rtol=0)
        outputs[request.request_id] = request.output_token_ids
    assert outputs["r0-0"] == outputs["r1-0"] and outputs["r0-0"] != outputs["r2-0"]


def test_longrope_uses_long_factors_past_the_original_length():
    config = tiny_config("phi3")
    head_dim = config.hidden_size // config.num_attention_heads
    cos, sin = rope_table(config, head_dim, 128)
    for inv_freq_seq_len, positions in ((None, slice(0, 64)), (65, slice(64, 128))):
        inv_freq, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=inv_freq_seq_len)
        freqs = torch.arange(128, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        torch.testing.assert_close(cos[positions], (emb.cos() * scaling)[positions])
        torch.testing.assert_close(sin[positions], (emb.sin() * scaling)[positions])
