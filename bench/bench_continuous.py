"""bench-continuous: continuous batching against static batches, same engine, same requests.

64 requests over 16 adapters, output lengths drawn from 16..256 (fixed seed, ignore_eos so
the lengths are exact), greedy, fp32. Continuous: all 64 submitted at once; requests join
and leave the running batch at every step. Static: the same requests in batches of 16,
each batch run to completion before the next starts (the batch shrinks as its requests
finish and nothing takes their place). Last line: `bench-continuous: continuous=A static=B tok/s`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.common import bench_engine_parts, chat_prompts, make_bench_adapters, median_min_max, timed, write_result
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.model_fetch import default_model_dir
from loramux.server.offline import OfflineEngine, OfflineRequest

NUM_REQUESTS, NUM_ADAPTERS, STATIC_BATCH = 64, 16, 16
MIN_NEW, MAX_NEW = 16, 256


def workload(tokenizer, names: list[str], seed: int = 0) -> list[OfflineRequest]:
    rng = random.Random(seed)
    prompts = chat_prompts(tokenizer, NUM_REQUESTS, 70)
    return [
        OfflineRequest(
            prompt,
            SamplingParams(max_tokens=rng.randint(MIN_NEW, MAX_NEW), temperature=0.0, ignore_eos=True),
            names[i % len(names)],
        )
        for i, prompt in enumerate(prompts)
    ]


def throughput(engine: OfflineEngine, batches: list[list[OfflineRequest]]) -> float:
    def run():
        return [r for batch in batches for r in engine.generate(batch)]

    seconds, results = timed(run)
    return sum(len(r.token_ids) for r in results) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapters"
        names = make_bench_adapters(args.model_dir, adapter_dir, "cont", [8] * NUM_ADAPTERS, seed=200)
        parts = bench_engine_parts(args.model_dir, adapter_dir, NUM_ADAPTERS, 8, max_num_seqs=NUM_REQUESTS)
        engine = OfflineEngine(parts.core)
        requests = workload(tokenizer, names)
        engine.generate(requests[:STATIC_BATCH])  # warm-up: adapters loaded, kernel built
        static_batches = [requests[i : i + STATIC_BATCH] for i in range(0, NUM_REQUESTS, STATIC_BATCH)]
        results = {"continuous": [], "static": []}
        for run in range(args.runs):  # interleaved, so drift hits both alike
            results["continuous"].append(throughput(engine, [requests]))
            results["static"].append(throughput(engine, static_batches))
            print(f"  run {run + 1}: continuous={results['continuous'][-1]:.1f} static={results['static'][-1]:.1f} tok/s",
                  flush=True)
        parts.close()
    summary = {name: median_min_max(values) for name, values in results.items()}
    a, b = summary["continuous"]["median"], summary["static"]["median"]
    summary["ratio"] = a / b
    summary["output_lengths"] = [r.params.max_tokens for r in requests]
    path = write_result("bench_continuous", summary)
    print(f"  continuous/static = {a / b:.2f} (target >= 1.5); {path}")
    print(f"bench-continuous: continuous={a:.1f} static={b:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
