"""bench-engine: multi-adapter batches against base-only, and against transformers + peft.

16 chat prompts of about 70 tokens, exactly 64 new tokens each, greedy, fp32, 2 torch
threads; median of 3 runs after a warm-up, all three measured in this one run:
  (a) our engine, base model only;
  (b) our engine, 16 requests over 8 adapters (ranks 8/16/32, all-linear);
  (c) transformers + peft, the same 8-adapter batch through generate(adapter_names=...).
Last line: `bench-engine: base=A mixed8=B hf_peft_mixed8=C tok/s`.

--profile (make bench-engine BENCH_ARGS=--profile) then runs the base and the mixed8
batch once more with the step profiler attached (server/profiling.py) and prints, per
phase, the ms per step and the share of the step: schedule, prepare, forward, lora,
attention, sample, update, detokenize. --dtype bfloat16 runs our engine in bf16 (the
result file is written for the default settings only); --quick is a smoke run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import bench_engine_parts, chat_prompts, make_bench_adapters, median_min_max, timed, write_result
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.model_fetch import default_model_dir
from loramux.server.offline import OfflineEngine, OfflineRequest
from loramux.server.profiling import attach_step_profiler

NUM_REQUESTS, NEW_TOKENS, RUNS = 16, 64, 3
RANKS = (8, 16, 32, 8, 16, 32, 8, 16)


def run_ours(engine: OfflineEngine, prompts, adapters, new_tokens: int = NEW_TOKENS) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    requests = [OfflineRequest(p, params, a) for p, a in zip(prompts, adapters)]
    seconds, results = timed(lambda: engine.generate(requests))
    assert all(len(r.token_ids) == new_tokens for r in results), "a request stopped early"
    return len(requests) * new_tokens / seconds


def profile_ours(parts, engine: OfflineEngine, prompts, adapters, new_tokens: int) -> dict:
    """One run with the step profiler attached: where each step's time goes."""
    profiler = attach_step_profiler(parts.core)
    try:
        run_ours(engine, prompts, adapters, new_tokens)
    finally:
        profiler.detach()
    print(profiler.profile.table(), flush=True)
    return profiler.profile.summary()


def run_hf_peft(peft_model, tokenizer, prompts, adapters) -> float:
    # Left padding: every row's last prompt token sits at the end, as generate() needs.
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def generate():
        with torch.no_grad():
            return peft_model.generate(
                input_ids=input_ids, attention_mask=mask, adapter_names=adapters,
                max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad,
            )

    seconds, out = timed(generate)
    assert out.shape[1] == width + NEW_TOKENS
    return NUM_REQUESTS * NEW_TOKENS / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--skip-hf", action="store_true", help="skip (c), the slow reference")
    parser.add_argument("--profile", action="store_true", help="print where a step's time goes, per phase")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"), help="our engine's dtype")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 run of 16 new tokens, no (c)")
    args = parser.parse_args(argv)
    runs, new_tokens = (1, 16) if args.quick else (RUNS, NEW_TOKENS)
    args.skip_hf |= args.quick
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = chat_prompts(tokenizer, NUM_REQUESTS, 70)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapters"
        names = make_bench_adapters(args.model_dir, adapter_dir, "bench", RANKS, seed=100)
        parts = bench_engine_parts(args.model_dir, adapter_dir, max_loras=8, max_lora_rank=32, dtype=args.dtype)
        engine = OfflineEngine(parts.core)
        base = [None] * NUM_REQUESTS
        mixed = [names[i % len(names)] for i in range(NUM_REQUESTS)]
        run_ours(engine, prompts, mixed, new_tokens)  # warm-up: loads the 8 adapters, builds the kernel
        run_ours(engine, prompts, base, new_tokens)
        ours = {"base": [], "mixed8": []}
        for run in range(runs):  # interleaved, so drift hits both alike
            ours["base"].append(run_ours(engine, prompts, base, new_tokens))
            ours["mixed8"].append(run_ours(engine, prompts, mixed, new_tokens))
            print(f"  run {run + 1}: base={ours['base'][-1]:.1f} mixed8={ours['mixed8'][-1]:.1f} tok/s", flush=True)
        profiles = {}
        if args.profile:
            for name, adapters in (("base", base), ("mixed8", mixed)):
                print(f"  {name}:", flush=True)
                profiles[name] = profile_ours(parts, engine, prompts, adapters, new_tokens)
        parts.close()
        result = {name: median_min_max(values) for name, values in ours.items()}
        hf = {"median": float("nan")}
        if not args.skip_hf:
            hf_model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
            peft_model = PeftModel.from_pretrained(hf_model, adapter_dir / names[0], adapter_name=names[0])
            for name in names[1:]:
                peft_model.load_adapter(adapter_dir / name, adapter_name=name)
            peft_model.eval()
            run_hf_peft(peft_model, tokenizer, prompts, mixed)  # warm-up
            runs = []
            for run in range(RUNS):
                runs.append(run_hf_peft(peft_model, tokenizer, prompts, mixed))
                print(f"  run {run + 1}: hf_peft_mixed8={runs[-1]:.1f} tok/s", flush=True)
            hf = median_min_max(runs)
        result["hf_peft_mixed8"] = hf
    a, b, c = result["base"]["median"], result["mixed8"]["median"], hf["median"]
    result["mixed8_over_base"] = b / a
    result["mixed8_over_hf_peft"] = b / c if c == c else None
    result["prompt_tokens"] = [len(p) for p in prompts]
    result["dtype"] = args.dtype
    if profiles:
        result["profile"] = profiles
    defaults = not args.quick and args.dtype == "float32" and not args.skip_hf
    path = write_result("bench_engine", result) if defaults else "result not written (not the default settings)"
    print(f"  mixed8/base = {b / a:.3f} (target >= 0.85); mixed8/hf_peft = {b / c:.2f}x (target >= 3); {path}")
    print(f"bench-engine: base={a:.1f} mixed8={b:.1f} hf_peft_mixed8={c:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
