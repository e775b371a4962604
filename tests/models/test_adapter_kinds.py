"""DoRA and embed_tokens / lm_head adapters against peft, mixed with plain LoRA in one batch.

Every family's tiny random model, fp32, greedy: each request's logits at every step equal
peft's (teacher-forced on our tokens) and its tokens are peft's argmax.
"""

from __future__ import annotations

import pytest
import torch

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import MODEL_LEVEL, load_adapter
from loramux.kernels.metadata import build_lora_batch_info
from tests.engine_fixtures import default_model_or_skip
from tests.models.peft_batch import MAX_RANK, assert_matches_peft, peft_logits, serve_batch
from tests.peft_adapters import ADAPTER_KIND_RECIPES, AdapterRecipe
from tests.tiny_models import FAMILY_KINDS, save_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 90, 17]]

ADAPTER_KINDS = ADAPTER_KIND_RECIPES


def run_batch(tmp_path, kind: str, backend_name: str, recipes=ADAPTER_KINDS, device: str | torch.device = "cpu"):
    """(requests after a greedy batch run, our logits per request, peft model with every
    adapter, our model) on a tiny model of `kind`. The peft reference runs on the CPU."""
    hf = save_tiny_model(tmp_path / "base", kind)
    return serve_batch(hf, tmp_path / "base", tmp_path, recipes, PROMPTS, backend_name, device)


@pytest.mark.parametrize(
    "kind,backend_name",
    [("llama", "cpu"), ("llama-tied", "cpu"), ("llama-bias", "torch"), *((kind, "torch") for kind in FAMILY_KINDS)],
)
def test_dora_and_vocab_adapters_match_peft(tmp_path, kind, backend_name):
    requests, ours, peft, _ = run_batch(tmp_path, kind, backend_name)
    assert_matches_peft(requests, ours, peft)


def test_dora_factor_is_computed_once_at_load(tmp_path):
    """The slot holds m / ||W + s B A||_row (fp32) from the write on; plain LoRA slots hold 1."""
    requests, _, peft, model = run_batch(tmp_path, "llama", "torch", ADAPTER_KINDS[:2])
    buffers = model.lora_buffers()
    q = buffers[(0, "q_proj")]
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight + layer.scaling["dora-all"] * (
        layer.lora_B["dora-all"].weight @ layer.lora_A["dora-all"].weight
    )
    expected = layer.lora_magnitude_vector["dora-all"].weight / weight.norm(dim=1)
    torch.testing.assert_close(q.dora_scale[1], expected.detach(), atol=1e-6, rtol=1e-6)
    assert q.dora_host[1] and not q.dora_host[2] and q.num_dora_slots == 1
    assert torch.equal(q.dora_scale[2], torch.ones(q.out_features))  # plain LoRA
    assert torch.equal(q.dora_scale[-1], torch.ones(q.out_features))  # what base tokens read
    # Rewriting the slot with a plain adapter resets its factor.
    plain = load_adapter("plain", tmp_path / "adapters" / "plain-o-down", model.spec.base_model_spec(), MAX_RANK)
    write_adapter_to_slot(buffers, 1, plain)
    assert not q.dora_host[1] and q.num_dora_slots == 0 and torch.equal(q.dora_scale[1], torch.ones(q.out_features))


def test_lm_head_adapter_applies_to_logits_only_with_tied_embeddings(tmp_path):
    """Tied embeddings: an lm_head adapter changes the logits, not the embedding lookup."""
    recipe = AdapterRecipe("head", r=4, target_modules=["lm_head"], seed=7, b_std=0.2)
    requests, ours, peft, model = run_batch(tmp_path, "llama-tied", "torch", [recipe])
    assert model.weights.lm_head is model.weights.embed  # tied, one tensor
    head = model.lora_buffers()[(MODEL_LEVEL, "lm_head")]
    embed = model.lora_buffers()[(MODEL_LEVEL, "embed_tokens")]
    assert head.ranks_host[1] == 4 and embed.ranks_host[1] == 0
    assert_matches_peft(requests, ours, peft)
    # Without the rows' slots, compute_logits gives the base logits.
    hidden = torch.randn(2, model.spec.hidden_size)
    info = build_lora_batch_info([1, 1], [1, 1])
    assert not torch.equal(model.compute_logits(hidden, info), model.compute_logits(hidden))


def test_ensure_weight_tying_adapts_lm_head_with_the_embedding(tmp_path):
    """PEFT's ensure_weight_tying on tied embeddings: the config names embed_tokens only, and
    lm_head gets the embedding's factors (saved as its own); both apply, as in peft."""
    recipe = AdapterRecipe(
        "tied-pair", r=4, target_modules=["o_proj", "lm_head"], ensure_weight_tying=True, seed=8, b_std=0.2
    )
    requests, ours, peft, model = run_batch(tmp_path, "llama-tied", "cpu", [recipe])
    buffers = model.lora_buffers()
    assert buffers[(MODEL_LEVEL, "embed_tokens")].ranks_host[1] == 4
    assert buffers[(MODEL_LEVEL, "lm_head")].ranks_host[1] == 4
    assert_matches_peft(requests, ours, peft)


DEFAULT_MODEL_KINDS = [
    AdapterRecipe("dora-all-r8", r=8, lora_alpha=16, use_dora=True, magnitude_jitter=0.05, seed=21, b_std=0.02),
    AdapterRecipe("plain-qv-r8", r=8, target_modules=["q_proj", "v_proj"], seed=22, b_std=0.04),
    AdapterRecipe(
        "embed-head-r8", r=8, target_modules=["embed_tokens", "lm_head"], seed=23, b_std=0.05, embedding_a_std=0.5
    ),
    AdapterRecipe(
        "dora-head-mlp-r4",
        r=4,
        target_modules=["lm_head", "gate_proj", "down_proj"],
        use_dora=True,
        magnitude_jitter=0.05,
        seed=24,
        b_std=0.02,
    ),
]


@pytest.mark.slow  # peft recomputes every DoRA norm per forward: about a minute of CPU
def test_default_model_dora_and_vocab_adapters_match_peft(tmp_path):
    """The default model (tied embeddings), fp32, greedy: DoRA, plain LoRA, embedding and
    lm_head adapters and base requests in one batch, token for token as peft."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = default_model_or_skip()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tokenizer("The capital of France is").input_ids]
    requests, ours, peft, _ = serve_batch(hf, model_dir, tmp_path, DEFAULT_MODEL_KINDS, prompts, "cpu")
    assert_matches_peft(requests, ours, peft)


def test_bf16_serves_dora_and_vocab_adapters_close_to_peft(tmp_path):
    """bf16 (the CPU backend's bf16 kernel; DoRA factors still fp32): measured against peft
    in fp32, teacher-forced on our tokens."""
    hf = save_tiny_model(tmp_path / "base", "llama")
    requests, ours, peft, model = serve_batch(
        hf, tmp_path / "base", tmp_path, ADAPTER_KINDS, PROMPTS, "cpu", dtype=torch.bfloat16
    )
    assert model.dtype == torch.bfloat16
    agree = total = 0
    for request in requests:
        ref = peft_logits(peft, request)
        got = torch.stack(ours[request.request_id])
        assert (got - ref).abs().max() < 0.05 * ref.abs().max(), request.adapter_id  # measured: <= 2%
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ref)
    assert agree / total >= 0.9, f"{agree}/{total} greedy tokens agree with fp32 peft"
