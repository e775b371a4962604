"""bench-structured: the W16 workload with half of its requests under a JSON schema.

16 chat prompts of about 70 tokens over 8 adapters (r=16, all-linear; adapter i % 8),
exactly 64 new tokens each, greedy, fp32, 2 torch threads, through the engine (no HTTP):
  free:            all 16 requests free;
  constrained_mix: the same 16, the even ones under a JSON schema (an array of at least 40
                   records, so the grammar constrains all 64 tokens; compiled once before
                   the runs, as admission does) and the odd ones free, in one batch.
Median of 3 interleaved runs after a warm-up. mask_us_per_token: all grammar work (the
worker thread's accept + next mask, and what apply() adds to the step) per constrained
token, over the constrained runs (waits for the worker not counted twice). Every constrained output is checked to be a valid
prefix of the schema's JSON (the grammar never let a wrong token through).
Last line: `bench-structured: free_tok_s=A constrained_mix_tok_s=B ratio=B/A mask_us_per_token=M`.
Target: ratio >= 0.85. Result: bench/results/bench_structured.json (with the CPU flags).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch
import xgrammar
from transformers import AutoTokenizer

from bench.common import bench_engine_parts, chat_prompts, make_bench_adapters, median_min_max, timed, write_result
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.dtype_choice import cpu_flags
from loramux.server.model_fetch import default_model_dir
from loramux.server.offline import OfflineEngine, OfflineRequest
from loramux.server.structured.compiler import GrammarCompiler
from loramux.server.structured.spec import json_schema_spec

NUM_ADAPTERS, RANK = 8, 16
RECORDS_SCHEMA = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12},
                               "score": {"type": "integer", "minimum": 0, "maximum": 100},
                               "kind": {"enum": ["a", "b", "c"]}},
                "required": ["name", "score", "kind"],
            },
        },
    },
    "required": ["records"],
}


def run(engine: OfflineEngine, requests: list[OfflineRequest], new_tokens: int) -> float:
    seconds, results = timed(lambda: engine.generate(requests))
    assert all(r.error is None and len(r.token_ids) == new_tokens for r in results), "a request stopped early"
    for request, result in zip(requests, results):
        if request.params.grammar is not None:  # the whole output is a prefix the grammar accepts
            matcher = xgrammar.GrammarMatcher(request.params.grammar)
            assert all(matcher.accept_token(t) for t in result.token_ids), result.text
    return len(requests) * new_tokens / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the result here instead of bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    prompts = chat_prompts(tokenizer, args.requests, 70)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapters"
        names = make_bench_adapters(args.model_dir, adapter_dir, "structured", [RANK] * NUM_ADAPTERS, seed=500)
        parts = bench_engine_parts(args.model_dir, adapter_dir, max_loras=NUM_ADAPTERS, max_lora_rank=RANK)
        compiler = GrammarCompiler(tokenizer, parts.model.spec.vocab_size, parts.eos_token_ids)
        grammar = compiler.compile_sync(json_schema_spec(RECORDS_SCHEMA, "response_format"))
        engine = OfflineEngine(parts.core)
        free_params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        adapters = [names[i % NUM_ADAPTERS] for i in range(args.requests)]
        free = [OfflineRequest(p, free_params, a) for p, a in zip(prompts, adapters)]
        mixed = [replace(r, params=replace(free_params, grammar=grammar)) if i % 2 == 0 else r
                 for i, r in enumerate(free)]
        run(engine, mixed, args.new_tokens)  # warm-up: adapters loaded, kernels built
        masks = parts.core.runner.grammar_masks
        masks.stats = type(masks.stats)()
        runs: dict[str, list[float]] = {"free": [], "constrained_mix": []}
        for i in range(args.runs):  # interleaved, so drift hits both alike
            runs["free"].append(run(engine, free, args.new_tokens))
            runs["constrained_mix"].append(run(engine, mixed, args.new_tokens))
            print(f"  run {i + 1}: free={runs['free'][-1]:.1f} constrained_mix={runs['constrained_mix'][-1]:.1f} tok/s",
                  flush=True)
        stats = masks.stats
        compiler.close()
        parts.close()
    a, b = median_min_max(runs["free"]), median_min_max(runs["constrained_mix"])
    ratio = b["median"] / a["median"]
    flags = sorted(cpu_flags())
    payload = {
        "workload": {"requests": args.requests, "adapters": NUM_ADAPTERS, "rank": RANK, "new_tokens": args.new_tokens,
                     "constrained": (args.requests + 1) // 2, "schema": RECORDS_SCHEMA},
        "free_tok_s": a,
        "constrained_mix_tok_s": b,
        "ratio": ratio,
        "target_ratio": 0.85,
        "mask_us_per_token": stats.us_per_token,
        "mask_worker_s": stats.worker_seconds,
        "mask_critical_path_s": stats.critical_seconds,
        "mask_wait_for_worker_s": stats.wait_seconds,
        "constrained_tokens": stats.num_tokens,
        "grammar_engine": f"xgrammar {version('xgrammar')}",
        "lscpu_flags": flags,
    }
    if args.out is None:
        path = write_result("bench_structured", payload)
    else:  # smoke runs keep bench/results clean
        path = args.out
        path.write_text(json.dumps(payload, indent=1))
    print(f"  ratio {ratio:.3f} (target >= 0.85); {path}")
    print(f"bench-structured: free_tok_s={a['median']:.1f} constrained_mix_tok_s={b['median']:.1f} "
          f"ratio={ratio:.3f} mask_us_per_token={stats.us_per_token:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
