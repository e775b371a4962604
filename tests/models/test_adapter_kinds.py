"""DoRA and embed_tokens / lm_head adapters against peft, mixed with plain LoRA in one batch.

Every family's tiny random model, fp32, greedy: each request's logits at every step equal
peft's (teacher-forced on our tokens) and its tokens are peft's argmax.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import MODEL_LEVEL, load_adapter
from loramux.kernels.backend import select_backend
from loramux.kernels.metadata import build_lora_batch_info
from loramux.scheduler.request import BASE_SLOT, Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.models.loader import load_model
from loramux.server.runner.model_runner import ModelRunner
from tests.peft_adapters import AdapterRecipe, make_peft_adapter
from tests.tiny_models import FAMILY_KINDS, generate_static, save_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 90, 17]]
NUM_STEPS = 5
MAX_RANK = 8

# Module names every family has (Phi-3 packs q/k/v and gate/up, so "all-linear" covers those).
ADAPTER_KINDS = [
    AdapterRecipe("dora-all", r=4, lora_alpha=8, use_dora=True, magnitude_jitter=0.2, seed=1, b_std=0.1),
    AdapterRecipe("plain-o-down", r=8, target_modules=["o_proj", "down_proj"], seed=2, b_std=0.1),
    AdapterRecipe("embed-head", r=6, lora_alpha=12, target_modules=["embed_tokens", "lm_head", "o_proj"], seed=3, b_std=0.1),
    AdapterRecipe(
        "dora-head-r-pattern",
        r=5,
        lora_alpha=5,
        target_modules=["lm_head", "down_proj"],
        rank_pattern={"lm_head": 3},
        use_dora=True,
        magnitude_jitter=0.2,
        seed=4,
        b_std=0.1,
    ),
]


def run_batch(tmp_path, kind: str, backend_name: str, recipes=ADAPTER_KINDS):
    """(requests after a greedy batch run, our logits per request, peft model with every adapter)."""
    hf = save_tiny_model(tmp_path / "base", kind)
    dirs = [make_peft_adapter(hf, recipe, tmp_path / "adapters") for recipe in recipes]
    backend = select_backend(torch.device("cpu"), torch.float32, tmp_path / "kcache", backend_name)
    model = load_model(tmp_path / "base", backend, max_lora_slots=len(recipes) + 1, max_lora_rank=MAX_RANK)
    spec = model.spec.base_model_spec()
    slots = {}
    for slot, (recipe, directory) in enumerate(zip(recipes, dirs), start=1):
        write_adapter_to_slot(model.lora_buffers(), slot, load_adapter(recipe.name, directory, spec, MAX_RANK))
        slots[recipe.name] = slot
    runner = ModelRunner(model, num_kv_blocks=128, block_size=4)
    # Every adapter and base on each prompt, interleaved: DoRA, plain LoRA and base share a batch.
    plan = [(name, p) for p in PROMPTS for name in [*slots, None]]
    requests = [
        Request(
            f"r{i}",
            list(prompt),
            SamplingParams(max_tokens=NUM_STEPS, temperature=0),
            adapter_id=name,
            adapter_slot=slots[name] if name else BASE_SLOT,
        )
        for i, (name, prompt) in enumerate(plan)
    ]
    ours = generate_static(runner, requests, NUM_STEPS)
    peft = PeftModel.from_pretrained(hf, dirs[0], adapter_name=recipes[0].name)
    for recipe, directory in zip(recipes[1:], dirs[1:]):
        peft.load_adapter(directory, adapter_name=recipe.name)
    return requests, ours, peft.eval(), model


def peft_logits(peft, request: Request) -> torch.Tensor:
    """peft's logits [steps, vocab] teacher-forced on the request's tokens."""
    tokens = torch.tensor([request.all_token_ids])
    with torch.no_grad():
        if request.adapter_id is None:
            with peft.disable_adapter():
                out = peft(tokens).logits[0]
        else:
            peft.set_adapter(request.adapter_id)
            out = peft(tokens).logits[0]
    return out[request.num_prompt_tokens - 1 : request.num_tokens - 1]


def assert_matches_peft(requests, ours, peft) -> None:
    first_steps = {}
    for request in requests:
        ref = peft_logits(peft, request)
        got = torch.stack(ours[request.request_id])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert request.output_token_ids == ref.argmax(-1).tolist(), request.adapter_id
        first_steps[(request.adapter_id, tuple(request.prompt_token_ids))] = got[0]
    # Each adapter moves the logits well past the tolerance: a match is not two no-ops agreeing.
    for (adapter, prompt), logits in first_steps.items():
        if adapter is not None:
            assert (logits - first_steps[(None, prompt)]).abs().max() > 0.05, adapter


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
    model.lora_backend.prepare(info)
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
