"""Our forward against transformers (+ peft) on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import load_adapter
from loramux.kernels.backend import select_backend
from loramux.scheduler.request import BASE_SLOT, Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.models.loader import load_model
from loramux.server.runner.model_runner import ModelRunner
from tests.peft_adapters import family_recipes, make_peft_adapter
from tests.tiny_models import FAMILY_KINDS, generate_static, save_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40]]
NUM_STEPS = 6


def reference_logits(hf_model, tokens: list[int], num_prompt: int) -> torch.Tensor:
    """transformers' logits [steps, vocab] for positions num_prompt-1 .. len-2 (teacher-forced)."""
    with torch.no_grad():
        out = hf_model(torch.tensor([tokens])).logits[0]
    return out[num_prompt - 1 : len(tokens) - 1]


@pytest.mark.parametrize("kind", ["llama-tied", "llama-bias", "mistral", *FAMILY_KINDS])
def test_base_forward_matches_transformers(tmp_path, kind):
    hf = save_tiny_model(tmp_path, kind)
    model = load_model(tmp_path, select_backend(torch.device("cpu"), torch.float32, name="torch"))
    runner = ModelRunner(model, num_kv_blocks=64, block_size=4)
    requests = [
        Request(f"r{i}", p, SamplingParams(max_tokens=NUM_STEPS, temperature=0), adapter_slot=BASE_SLOT)
        for i, p in enumerate(PROMPTS)
    ]
    ours = generate_static(runner, requests, NUM_STEPS)
    for request in requests:
        ref = reference_logits(hf, request.all_token_ids, request.num_prompt_tokens)
        got = torch.stack(ours[request.request_id])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert request.output_token_ids == ref.argmax(-1).tolist()


@pytest.mark.parametrize(
    "kind,backend_name", [("llama", "cpu"), *((kind, "torch") for kind in FAMILY_KINDS)]
)
def test_mixed_adapter_batch_matches_peft(tmp_path, kind, backend_name):
    """Adapters of different ranks and target sets plus base requests share one batch."""
    hf = save_tiny_model(tmp_path / "base", kind)
    recipes = family_recipes(kind)
    adapter_dirs = [make_peft_adapter(hf, recipe, tmp_path / "adapters") for recipe in recipes]
    backend = select_backend(torch.device("cpu"), torch.float32, tmp_path / "kcache", backend_name)
    model = load_model(tmp_path / "base", backend, max_lora_slots=len(recipes) + 1, max_lora_rank=16)
    spec = model.spec.base_model_spec()
    slots = {}
    for slot, (recipe, directory) in enumerate(zip(recipes, adapter_dirs), start=1):
        adapter = load_adapter(recipe.name, directory, spec, max_rank=16)
        write_adapter_to_slot(model.lora_buffers(), slot, adapter)
        slots[recipe.name] = slot
    runner = ModelRunner(model, num_kv_blocks=128, block_size=4)
    # Each adapter twice (different prompts) and base twice, interleaved on purpose.
    plan = [(name, p) for p in (PROMPTS[0], PROMPTS[2]) for name in [*slots, None]]
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

    peft = PeftModel.from_pretrained(hf, adapter_dirs[0], adapter_name=recipes[0].name)
    for recipe, directory in zip(recipes[1:], adapter_dirs[1:]):
        peft.load_adapter(directory, adapter_name=recipe.name)
    peft.eval()
    base_outputs = {}
    for request in requests:
        if request.adapter_id is None:
            with peft.disable_adapter():
                ref = reference_logits(peft, request.all_token_ids, request.num_prompt_tokens)
            base_outputs[tuple(request.prompt_token_ids)] = request.output_token_ids
        else:
            peft.set_adapter(request.adapter_id)
            ref = reference_logits(peft, request.all_token_ids, request.num_prompt_tokens)
        torch.testing.assert_close(torch.stack(ours[request.request_id]), ref, atol=1e-4, rtol=0)
        assert request.output_token_ids == ref.argmax(-1).tolist()
    # The adapters are strong enough to change what the model says.
    changed = [
        r.request_id for r in requests if r.adapter_id and r.output_token_ids != base_outputs[tuple(r.prompt_token_ids)]
    ]
    assert len(changed) >= len(recipes)
