"""bench-serve: the HTTP server under 32 concurrent streaming clients, against the engine offline.

Starts `loramux serve` on a free 127.0.0.1 port with 8 adapters (r=16, all-linear), then
32 closed-loop clients stream /v1/chat/completions (each sends its next request when the
last one ends; adapter i % 8; 64 new tokens, ignore_eos, greedy) for 60 seconds. Then it
stops the server and runs the very requests the clients completed through the engine
offline (no HTTP), 32 at a time, in the same process run. HTTP, streaming and
detokenization may cost at most 20%: tok_s >= 0.8 x offline_tok_s.
Last line: `bench-serve: tok_s=A offline_tok_s=F ttft_p50_ms=B ttft_p99_ms=C itl_p50_ms=D errors=E`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from bench.common import bench_engine_parts, make_bench_adapters, timed, write_result
from bench.http_load import drive, free_port, wait_healthy
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.model_fetch import default_model_dir
from loramux.server.offline import OfflineEngine, OfflineRequest

NUM_CLIENTS, NUM_ADAPTERS, NEW_TOKENS = 32, 8, 64
SERVER_ARGS = ["--max-loras", "8", "--max-lora-rank", "16", "--max-num-seqs", "64", "--kv-cache-bytes", "1G",
               "--max-model-len", "1024", "--threads", "2", "--log-level", "warning", "--dtype", "float32"]


def start_server(model_dir: Path, adapter_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "loramux.server.cli", "serve", "--model", str(model_dir), "--served-model-name", "base",
         "--adapter-dir", str(adapter_dir), "--upload-dir", str(adapter_dir.parent / "uploads"),
         "--port", str(port), *SERVER_ARGS],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
    )
    return wait_healthy(process, f"http://127.0.0.1:{port}/health", log)


def offline_throughput(model_dir: Path, adapter_dir: Path, tokenizer, completed: list[tuple[str, str]]) -> float:
    # The clients kept 32 requests in flight: so does the offline run.
    parts = bench_engine_parts(model_dir, adapter_dir, NUM_ADAPTERS, 16, max_num_seqs=NUM_CLIENTS)
    engine = OfflineEngine(parts.core)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)

    def request(adapter: str, text: str) -> OfflineRequest:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
        return OfflineRequest(tokenizer(prompt, add_special_tokens=False).input_ids, params, adapter)

    requests = [request(a, t) for a, t in completed]
    engine.generate(requests[:NUM_CLIENTS])  # warm-up: adapters loaded, kernel built
    seconds, results = timed(lambda: engine.generate(requests))
    parts.close()
    return sum(len(r.token_ids) for r in results) / seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dir = Path(tmp) / "adapters"
        names = make_bench_adapters(args.model_dir, adapter_dir, "serve", [16] * NUM_ADAPTERS, seed=300)
        port = free_port()
        server = start_server(args.model_dir, adapter_dir, port, Path(tmp) / "server.log")
        try:
            base_url = f"http://127.0.0.1:{port}"
            # warm-up: loads, kernel build
            asyncio.run(drive(base_url, names, min(5.0, args.seconds), NUM_CLIENTS, NEW_TOKENS))
            stats, elapsed = asyncio.run(drive(base_url, names, args.seconds, NUM_CLIENTS, NEW_TOKENS))
        finally:
            server.terminate()
            server.wait(30)
        http_tok_s = stats.tokens / elapsed
        offline_tok_s = offline_throughput(args.model_dir, adapter_dir, tokenizer, stats.completed)
    ttft_p50, ttft_p99 = percentile(stats.ttft_s, 0.5) * 1e3, percentile(stats.ttft_s, 0.99) * 1e3
    itl_p50 = statistics.median(stats.itl_s) * 1e3 if stats.itl_s else float("nan")
    result = {
        "http_tok_s": http_tok_s, "offline_tok_s": offline_tok_s, "ratio": http_tok_s / offline_tok_s,
        "ttft_p50_ms": ttft_p50, "ttft_p99_ms": ttft_p99, "itl_p50_ms": itl_p50,
        "itl_p99_ms": percentile(stats.itl_s, 0.99) * 1e3, "errors": stats.errors,
        "requests": len(stats.completed), "seconds": elapsed, "clients": NUM_CLIENTS,
    }
    path = write_result("bench_serve", result)
    print(f"  {len(stats.completed)} requests in {elapsed:.1f} s; http/offline = {http_tok_s / offline_tok_s:.2f} "
          f"(target >= 0.8); {path}")
    print(f"bench-serve: tok_s={http_tok_s:.1f} offline_tok_s={offline_tok_s:.1f} ttft_p50_ms={ttft_p50:.0f} "
          f"ttft_p99_ms={ttft_p99:.0f} itl_p50_ms={itl_p50:.0f} errors={stats.errors}")
    return 0 if stats.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
