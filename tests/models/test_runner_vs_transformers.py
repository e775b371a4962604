"""Our forward against transformers (+ peft) on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels.backend import select_backend
from loramux.scheduler.request import BASE_SLOT, Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.models.loader import load_model
from loramux.server.models.registry import supported_model_types
from loramux.server.runner.model_runner import ModelRunner
from tests.models.peft_batch import assert_matches_peft, serve_batch
from tests.peft_adapters import family_recipes
from tests.tiny_models import FAMILY_KINDS, generate_static, save_tiny_model, tiny_config

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], [40]]
NUM_STEPS = 6


def test_every_registered_family_is_compared():
    """A family added to the registry needs its tiny config here (and so in `make golden`)."""
    assert {tiny_config(kind).model_type for kind in FAMILY_KINDS} == set(supported_model_types())


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
    # Each adapter twice (different prompts) and base twice, interleaved on purpose.
    requests, ours, peft, _ = serve_batch(
        hf, tmp_path / "base", tmp_path, recipes, [PROMPTS[0], PROMPTS[2]], backend_name, max_rank=16, num_steps=NUM_STEPS
    )
    assert_matches_peft(requests, ours, peft)
    # The adapters are strong enough to change what the model says.
    base_outputs = {tuple(r.prompt_token_ids): r.output_token_ids for r in requests if r.adapter_id is None}
    changed = [
        r.request_id for r in requests if r.adapter_id and r.output_token_ids != base_outputs[tuple(r.prompt_token_ids)]
    ]
    assert len(changed) >= len(recipes)
