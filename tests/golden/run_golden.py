"""Golden test: loramux's batched multi-adapter forward against transformers + peft.

The default model in fp32; 8 adapters made with peft here (ranks 4 to 64; all-linear,
q+v only, a regex target, rsLoRA, rank_pattern/alpha_pattern, layers_to_transform, ...)
plus base-only requests: 16 requests in one batch, greedy, 32 new tokens. The reference
runs each request alone (transformers + peft, greedy generate). Every request's tokens
must equal the reference's; where they differ, the difference is allowed only if the
reference's top two logits at that step are within TIE_GAP (a tie), and the comparison
then continues teacher-forced on our tokens (reported). Logits must be within
LOGIT_ATOL (max abs) at every step.

`--families` adds, on the same terms, DoRA and embed_tokens / lm_head adapters on the
default model, and every model family on a tiny random model (plain LoRA of mixed ranks and
forms, DoRA, embedding and lm_head adapters, and base requests in one batch per family).

Run: `make golden` (the default model and every family; prints
`golden: M/N requests match, max_abs_logit_diff=X` last).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramux.adapter_store.device_slots import write_adapter_to_slot
from loramux.adapter_store.format import load_adapter
from loramux.kernels.backend import select_backend
from loramux.scheduler.request import BASE_SLOT, Request
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.model_fetch import default_model_dir
from loramux.server.models.loader import load_model
from loramux.server.runner.model_runner import ModelRunner
from tests.peft_adapters import ADAPTER_KIND_RECIPES, AdapterRecipe, family_recipes, make_peft_adapter
from tests.tiny_models import FAMILY_KINDS, generate_static, save_tiny_model

NEW_TOKENS = 32
LOGIT_ATOL = 1e-3
TIE_GAP = 1e-4
MAX_RANK = 64

RECIPES = [
    AdapterRecipe("all-linear-r4", r=4, lora_alpha=8, seed=11),
    AdapterRecipe("qv-r8", r=8, target_modules=["q_proj", "v_proj"], seed=12, b_std=0.04),
    AdapterRecipe("regex-r16", r=16, target_modules=r".*\.(k_proj|o_proj|gate_proj)", seed=13),
    AdapterRecipe("rslora-r32", r=32, use_rslora=True, lora_alpha=16, seed=14, b_std=0.01),
    AdapterRecipe(
        "patterns-r16",
        r=16,
        rank_pattern={"down_proj": 4, "k_proj": 8},
        alpha_pattern={"q_proj": 64.0, "up_proj": 4.0},
        seed=15,
    ),
    AdapterRecipe(
        "layers-r64",
        r=64,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        layers_to_transform=[0, 3, 7, 12, 20, 29],
        lora_alpha=32,
        seed=16,
        b_std=0.01,
    ),
    AdapterRecipe("mlp-r12-float-alpha", r=12, target_modules=["gate_proj", "up_proj", "down_proj"], lora_alpha=7.5, seed=17),
    AdapterRecipe("all-linear-r24", r=24, lora_alpha=48, seed=18, b_std=0.01),
]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three prime numbers.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a name for a cat.",
]


@dataclass(frozen=True)
class RequestResult:
    request_id: str
    adapter: str | None
    match: bool
    ties: tuple[int, ...]  # steps where we differ but the reference's top-2 are within TIE_GAP
    first_mismatch: int | None  # a real (non-tie) token mismatch
    max_abs_logit_diff: float
    # How far the adapter moves the first step's logits from the base model's (max abs):
    # proof that the adapter is not a no-op, so a match means something.
    adapter_effect: float


def build_plan() -> list[tuple[str | None, str]]:
    """16 requests: every adapter once, six adapters twice more, and two base requests."""
    names = [r.name for r in RECIPES]
    plan = [(name, QUESTIONS[i]) for i, name in enumerate(names)]
    plan += [(name, QUESTIONS[(i + 3) % len(QUESTIONS)]) for i, name in enumerate(names[:6])]
    plan += [(None, QUESTIONS[0]), (None, QUESTIONS[5])]
    return plan


def reference_run(peft_model, adapter: str | None, prompt: list[int], ours: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor | None]:
    """Greedy generate alone; and, if our tokens differ, logits teacher-forced on ours."""
    context = peft_model.disable_adapter() if adapter is None else _Nothing()
    if adapter is not None:
        peft_model.set_adapter(adapter)
    with context, torch.no_grad():
        out = peft_model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.int64),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        logits = torch.stack(out.logits, dim=1)[0].float()  # [steps, vocab]
        forced = None
        if tokens != ours:
            full = peft_model(torch.tensor([prompt + ours])).logits[0].float()
            forced = full[len(prompt) - 1 : len(prompt) - 1 + NEW_TOKENS]
    return tokens, logits, forced


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def compare(
    request: Request, ours: torch.Tensor, ref_tokens, ref_logits, forced, base_first: torch.Tensor
) -> RequestResult:
    """ours: [steps, vocab] our logits; base_first: the base model's first-step logits."""
    our_tokens = request.output_token_ids
    effect = float((ours[0] - base_first).abs().max())
    if forced is None:  # identical tokens: compare the free-running logits
        diff = float((ours - ref_logits).abs().max())
        return RequestResult(request.request_id, request.adapter_id, True, (), None, diff, effect)
    ties, first_bad = [], None
    for step, (ours_t, row) in enumerate(zip(our_tokens, forced)):
        best = int(row.argmax())
        if ours_t != best:
            top2 = row.topk(2).values
            if float(top2[0] - top2[1]) <= TIE_GAP:
                ties.append(step)
            elif first_bad is None:
                first_bad = step
    diff = float((ours - forced).abs().max())
    return RequestResult(request.request_id, request.adapter_id, first_bad is None, tuple(ties), first_bad, diff, effect)


def golden_batch(
    hf,
    model_dir: Path,
    workdir: Path,
    recipes: list[AdapterRecipe],
    plan: list[tuple[str | None, list[int]]],  # (adapter name or None for base, prompt ids)
    backend_name: str = "auto",
    max_rank: int = MAX_RANK,
    max_model_len: int | None = 1024,
) -> list[RequestResult]:
    """Every request of `plan` in one batch on loramux, then each alone on peft (greedy)."""
    adapter_dirs = {r.name: make_peft_adapter(hf, r, workdir) for r in recipes}
    backend = select_backend(torch.device("cpu"), torch.float32, name=backend_name)
    model = load_model(
        model_dir, backend, max_model_len=max_model_len, max_lora_slots=len(recipes), max_lora_rank=max_rank
    )
    spec = model.spec.base_model_spec()
    slots = {}
    for slot, recipe in enumerate(recipes):
        adapter = load_adapter(recipe.name, adapter_dirs[recipe.name], spec, max_rank=max_rank)
        write_adapter_to_slot(model.lora_buffers(), slot, adapter)
        slots[recipe.name] = slot
    runner = ModelRunner(model, num_kv_blocks=256, block_size=16)
    requests = [
        Request(
            f"req-{i}",
            list(prompt),
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
            adapter_id=adapter,
            adapter_slot=slots[adapter] if adapter else BASE_SLOT,
        )
        for i, (adapter, prompt) in enumerate(plan)
    ]
    ours = generate_static(runner, requests, NEW_TOKENS)  # all of them in one batch

    peft_model = PeftModel.from_pretrained(hf, adapter_dirs[recipes[0].name], adapter_name=recipes[0].name)
    for recipe in recipes[1:]:
        peft_model.load_adapter(adapter_dirs[recipe.name], adapter_name=recipe.name)
    peft_model.eval()
    results = []
    for request in requests:
        ref_tokens, ref_logits, forced = reference_run(
            peft_model, request.adapter_id, request.prompt_token_ids, request.output_token_ids
        )
        with peft_model.disable_adapter(), torch.no_grad():
            base_first = peft_model(torch.tensor([request.prompt_token_ids])).logits[0, -1].float()
        results.append(
            compare(request, torch.stack(ours[request.request_id]), ref_tokens, ref_logits, forced, base_first)
        )
    return results


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    prompts = []
    for question in questions:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def run_golden(model_dir: Path, workdir: Path, backend_name: str = "auto") -> list[RequestResult]:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    plan = build_plan()
    prompts = chat_prompts(tokenizer, [question for _, question in plan])
    return golden_batch(hf, model_dir, workdir, RECIPES, [(a, p) for (a, _), p in zip(plan, prompts)], backend_name)


# DoRA and embed_tokens / lm_head adapters on the default model (tied embeddings).
KIND_RECIPES = [
    AdapterRecipe("dora-qv-r8", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True,
                  magnitude_jitter=0.05, seed=31, b_std=0.04),
    AdapterRecipe("embed-head-r8", r=8, target_modules=["embed_tokens", "lm_head"], seed=32, b_std=0.05,
                  embedding_a_std=0.5),
    AdapterRecipe("dora-head-o-r4", r=4, target_modules=["lm_head", "o_proj"], use_dora=True,
                  magnitude_jitter=0.05, seed=33, b_std=0.04),
    AdapterRecipe("plain-mlp-r16", r=16, target_modules=["gate_proj", "up_proj", "down_proj"], seed=34),
]


def run_adapter_kinds_golden(model_dir: Path, workdir: Path, backend_name: str = "auto") -> list[RequestResult]:
    """KIND_RECIPES (DoRA, embedding / lm_head, plain) and base requests in one batch."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, QUESTIONS[:2])
    plan = [(name, p) for p in prompts for name in [*(r.name for r in KIND_RECIPES), None]]
    return golden_batch(hf, model_dir, workdir, KIND_RECIPES, plan, backend_name)


FAMILY_PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23, 24, 25, 26, 27, 28], [3, 4]]


def run_family_golden(kind: str, workdir: Path, backend_name: str = "auto") -> list[RequestResult]:
    """A tiny random model of `kind`: plain LoRA of mixed ranks and forms, DoRA, embedding
    and lm_head adapters, and base requests in one batch."""
    hf = save_tiny_model(workdir / "base", kind)
    recipes = [*family_recipes(kind), *ADAPTER_KIND_RECIPES]
    names = [r.name for r in recipes]
    plan = [(name, FAMILY_PROMPTS[i % 2]) for i, name in enumerate(names)]
    plan += [(name, FAMILY_PROMPTS[2]) for name in names[::2]]
    plan += [(None, p) for p in FAMILY_PROMPTS]
    return golden_batch(hf, workdir / "base", workdir, recipes, plan, backend_name, max_rank=16, max_model_len=None)


def report(label: str, results: list[RequestResult]) -> None:
    print(label)
    for r in results:
        note = f" ties at steps {list(r.ties)} (teacher-forced after)" if r.ties else ""
        bad = f" MISMATCH at step {r.first_mismatch}" if r.first_mismatch is not None else ""
        print(
            f"  {r.request_id:7s} adapter={r.adapter or 'base':22s} max_abs_logit_diff={r.max_abs_logit_diff:.2e}"
            f" adapter_effect={r.adapter_effect:.2f}{note}{bad}"
        )
    weakest = min(r.adapter_effect for r in results if r.adapter)
    print(f"  weakest adapter effect on first-step logits: {weakest:.2f} (max abs vs base)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--families", action="store_true", help="also DoRA / embedding / lm_head adapters and every family")
    parser.add_argument("--json", type=Path, help="write the per-request results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    runs: dict[str, list[RequestResult]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["default model"] = run_golden(args.model_dir, Path(tmp) / "default", args.backend)
        report("default model", runs["default model"])
        if args.families:
            runs["default model, DoRA / embedding / lm_head"] = results = run_adapter_kinds_golden(
                args.model_dir, Path(tmp) / "kinds", args.backend
            )
            report("default model, DoRA / embedding / lm_head", results)
            for kind in FAMILY_KINDS:
                runs[f"family {kind}"] = results = run_family_golden(kind, Path(tmp) / kind, args.backend)
                report(f"family {kind} (tiny random model)", results)
    results = [r for rs in runs.values() for r in rs]
    matched = sum(r.match and r.max_abs_logit_diff <= LOGIT_ATOL for r in results)
    worst = max(r.max_abs_logit_diff for r in results)
    if args.json:
        args.json.write_text(json.dumps({name: [r.__dict__ for r in rs] for name, rs in runs.items()}, indent=1))
    print(f"  ({time.perf_counter() - started:.0f} s)")
    over = f" over {len(runs)} runs ({', '.join(runs)})" if len(runs) > 1 else ""
    print(f"golden: {matched}/{len(results)} requests match{over}, max_abs_logit_diff={worst:.2e}")
    return 0 if matched == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
