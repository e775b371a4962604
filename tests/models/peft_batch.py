"""One batch of mixed adapters on loramux, and peft's logits for the same requests."""

from __future__ import annotations

import torch
from peft import PeftModel

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import load_adapter
from loramux.kernels.backend import select_backend
from loramux.scheduler.request import BASE_SLOT, Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.models.loader import load_model
from loramux.server.runner.model_runner import ModelRunner
from tests.peft_adapters import make_peft_adapter
from tests.tiny_models import generate_static

NUM_STEPS = 5
MAX_RANK = 8


def serve_batch(
    hf,
    model_dir,
    workdir,
    recipes,
    prompts,
    backend_name: str,
    device="cpu",
    max_rank=MAX_RANK,
    num_steps=NUM_STEPS,
    dtype=torch.float32,
):
    """Every recipe's adapter and the base model on each prompt, interleaved in one batch:
    DoRA, plain LoRA, embedding / lm_head adapters and base requests share every step."""
    dirs = [make_peft_adapter(hf, recipe, workdir / "adapters") for recipe in recipes]
    device = torch.device(device)
    backend = select_backend(device, dtype, workdir / "kcache", backend_name)
    model = load_model(
        model_dir, backend, dtype=dtype, device=device, max_lora_slots=len(recipes) + 1, max_lora_rank=max_rank
    )
    spec = model.spec.base_model_spec()
    slots = {}
    for slot, (recipe, directory) in enumerate(zip(recipes, dirs), start=1):
        write_adapter_to_slot(model.lora_buffers(), slot, load_adapter(recipe.name, directory, spec, max_rank, dtype))
        slots[recipe.name] = slot
    runner = ModelRunner(model, num_kv_blocks=256, block_size=4)
    plan = [(name, p) for p in prompts for name in [*slots, None]]
    requests = [
        Request(
            f"r{i}",
            list(prompt),
            SamplingParams(max_tokens=num_steps, temperature=0),
            adapter_id=name,
            adapter_slot=slots[name] if name else BASE_SLOT,
        )
        for i, (name, prompt) in enumerate(plan)
    ]
    ours = generate_static(runner, requests, num_steps)
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
        got = torch.stack(ours[request.request_id]).cpu()
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
        assert request.output_token_ids == ref.argmax(-1).tolist(), request.adapter_id
        first_steps[(request.adapter_id, tuple(request.prompt_token_ids))] = got[0]
    # Each adapter moves the logits well past the tolerance: a match is not two no-ops agreeing.
    for (adapter, prompt), logits in first_steps.items():
        if adapter is not None:
            assert (logits - first_steps[(None, prompt)]).abs().max() > 0.05, adapter
