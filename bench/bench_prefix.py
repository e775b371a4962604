"""bench-prefix: a multi-tenant chat workload with prefix caching on and off, in one run.

8 adapters (r=8, all-linear), each with its own system prompt of 400 tokens; 64 clients
(client i talks to adapter i % 8) hold 4-turn conversations over HTTP
(/v1/chat/completions, streaming, greedy, ignore_eos, NEW_TOKENS new tokens a turn): each
turn resends the system prompt, the earlier turns and the answers, plus a new question.
The same workload runs against `loramux serve` twice on the default model: with prefix
caching (the default) and with `--no-prefix-caching`. Measured per run: TTFT p50 over
all turns, generated tokens per second over the run, and (caching on) the hit rate
= vllm:prefix_cache_hits / vllm:prefix_cache_queries (tokens) scraped from /metrics.
Targets: ttft_p50_off >= 3 x ttft_p50_on, tok_s_on >= tok_s_off, hit_rate >= 0.7.
Last line:
`bench-prefix: ttft_p50_on_ms=A ttft_p50_off_ms=B hit_rate=H tok_s_on=C tok_s_off=D`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from transformers import AutoTokenizer

from bench.bench_serve import free_port, percentile
from bench.common import make_bench_adapters, write_result
from loramux.server.model_fetch import default_model_dir

NUM_ADAPTERS, NUM_CLIENTS, NUM_TURNS, SYSTEM_TOKENS, NEW_TOKENS = 8, 64, 4, 400, 16
SERVER_ARGS = ["--max-loras", "8", "--max-lora-rank", "8", "--max-num-seqs", "64", "--kv-cache-bytes", "2G",
               "--max-model-len", "2048", "--log-level", "warning"]

DOMAINS = [
    ("a bicycle repair shop", "wheels, brakes, gears, chains, tyres and saddles"),
    ("a public library", "loans, renewals, reading rooms, archives and children's events"),
    ("a mountain hotel", "rooms, meals, ski passes, guided walks and the spa"),
    ("a city water utility", "bills, meter readings, leaks, water quality and new connections"),
    ("an online bookshop", "orders, shipping, returns, gift cards and author events"),
    ("a veterinary clinic", "vaccinations, check-ups, surgery, pet food and emergencies"),
    ("a train operator", "tickets, timetables, delays, bicycles on board and lost property"),
    ("a community garden", "plots, tools, compost, watering rotas and harvest festivals"),
]
QUESTIONS = [
    "What are your opening hours?", "How do I make a complaint?", "Can you help me with a booking?",
    "What should I bring on my first visit?", "Is there a discount for students?", "Who do I call in an emergency?",
    "Can I pay by card?", "Do you have a waiting list?", "What happens if I am late?", "Is the place accessible?",
]


def system_prompt(tokenizer, index: int) -> str:
    """About SYSTEM_TOKENS tokens of house rules for one tenant (distinct per adapter)."""
    name, topics = DOMAINS[index % len(DOMAINS)]
    rules = [
        f"You are the customer assistant of {name}. You help with {topics}.",
        "Always greet the customer politely and answer in at most three short sentences.",
        "Never promise refunds, prices or dates you cannot confirm; say what you can check instead.",
        f"Rule {{n}} for {name}: when a question concerns {topics.split(',')[0]}, ask for the reference "
        "number first, repeat the key facts back, and point to the right desk or web page.",
    ]
    text, n = " ".join(rules[:3]), 1
    while len(tokenizer(text, add_special_tokens=False).input_ids) < SYSTEM_TOKENS:
        text += " " + rules[3].format(n=n)
        n += 1
    ids = tokenizer(text, add_special_tokens=False).input_ids[:SYSTEM_TOKENS]
    return tokenizer.decode(ids)


@dataclass
class RunStats:
    tokens: int = 0
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    ttft_by_turn: dict[int, list[float]] = field(default_factory=dict)


async def conversation(http: httpx.AsyncClient, client: int, adapter: str, system: str, stats: RunStats) -> None:
    messages = [{"role": "system", "content": system}]
    for turn in range(NUM_TURNS):
        messages.append({"role": "user", "content": QUESTIONS[(client + 3 * turn) % len(QUESTIONS)]})
        body = {"model": adapter, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        sent, first, usage, text = time.monotonic(), None, None, []
        try:
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    stats.errors += 1
                    return
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        stats.errors += 1
                        return
                    usage = chunk.get("usage") or usage
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        first = first or time.monotonic()
                        text.append(chunk["choices"][0]["delta"]["content"])
        except httpx.HTTPError:
            stats.errors += 1
            return
        if first is None or usage is None or usage["completion_tokens"] != NEW_TOKENS:
            stats.errors += 1
            return
        stats.ttft_s.append(first - sent)
        stats.ttft_by_turn.setdefault(turn, []).append(first - sent)
        stats.tokens += usage["completion_tokens"]
        messages.append({"role": "assistant", "content": "".join(text)})


async def run_clients(base_url: str, adapters: list[str], systems: list[str],
                      num_clients: int) -> tuple[RunStats, float]:
    stats = RunStats()
    limits = httpx.Limits(max_connections=num_clients + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(
            conversation(http, i, adapters[i % len(adapters)], systems[i % len(adapters)], stats)
            for i in range(num_clients)
        ))
        return stats, time.monotonic() - started


def prefix_counters(base_url: str) -> tuple[float, float]:
    """(queries, hits) in tokens, summed over adapters, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"vllm:prefix_cache_queries": 0.0, "vllm:prefix_cache_hits": 0.0}
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in totals and sample.name.endswith("_total"):
                totals[name] += sample.value
    return totals["vllm:prefix_cache_queries"], totals["vllm:prefix_cache_hits"]


def start_server(model_dir: Path, adapter_dir: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "loramux.server.cli", "serve", "--model", str(model_dir), "--served-model-name", "base",
         "--adapter-dir", str(adapter_dir), "--upload-dir", str(adapter_dir.parent / "uploads"),
         "--port", str(port), *SERVER_ARGS, *extra],
        stdout=log.open("w"), stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not become healthy in 180 s")


def warm_up(base_url: str, adapters: list[str]) -> None:
    """Load every adapter and build the kernels with prompts that share nothing with the run."""
    for adapter in adapters:
        body = {"model": adapter, "messages": [{"role": "user", "content": f"warm-up {adapter}"}],
                "max_tokens": 2, "temperature": 0}
        httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=300).raise_for_status()


def measure(model_dir: Path, adapter_dir: Path, adapters: list[str], systems: list[str], tmp: Path,
            caching: bool, num_clients: int, threads: int) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    flags = ["--threads", str(threads)] + ([] if caching else ["--no-prefix-caching"])
    server = start_server(model_dir, adapter_dir, port, tmp / f"server-{caching}.log", flags)
    try:
        warm_up(base_url, adapters)
        queries0, hits0 = prefix_counters(base_url)
        stats, elapsed = asyncio.run(run_clients(base_url, adapters, systems, num_clients))
        queries1, hits1 = prefix_counters(base_url)
    finally:
        server.terminate()
        server.wait(30)
    queries, hits = queries1 - queries0, hits1 - hits0
    result = {
        "ttft_p50_ms": percentile(stats.ttft_s, 0.5) * 1e3,
        "ttft_p99_ms": percentile(stats.ttft_s, 0.99) * 1e3,
        "ttft_p50_ms_by_turn": {t: percentile(v, 0.5) * 1e3 for t, v in sorted(stats.ttft_by_turn.items())},
        "tok_s": stats.tokens / elapsed,
        "seconds": elapsed,
        "requests": len(stats.ttft_s),
        "errors": stats.errors,
        "prefix_cache_query_tokens": queries,
        "prefix_cache_hit_tokens": hits,
        "hit_rate": hits / queries if queries else 0.0,
    }
    print(f"  caching {'on ' if caching else 'off'}: {result['requests']} requests in {elapsed:.1f} s, "
          f"ttft p50 {result['ttft_p50_ms']:.0f} ms, {result['tok_s']:.1f} tok/s, hit rate {result['hit_rate']:.2f}, "
          f"errors {stats.errors}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--clients", type=int, default=NUM_CLIENTS, help="fewer for a quick smoke run")
    parser.add_argument("--threads", type=int, default=2,
                        help="the server's torch threads (1 is faster on a machine other jobs load)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    systems = [system_prompt(tokenizer, i) for i in range(NUM_ADAPTERS)]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        adapter_dir = tmp / "adapters"
        adapters = make_bench_adapters(args.model_dir, adapter_dir, "prefix", [8] * NUM_ADAPTERS, seed=500)
        on = measure(args.model_dir, adapter_dir, adapters, systems, tmp, caching=True, num_clients=args.clients,
                     threads=args.threads)
        off = measure(args.model_dir, adapter_dir, adapters, systems, tmp, caching=False, num_clients=args.clients,
                      threads=args.threads)
    result = {
        "on": on, "off": off,
        "ttft_speedup": off["ttft_p50_ms"] / on["ttft_p50_ms"],
        "tok_s_ratio": on["tok_s"] / off["tok_s"],
        "targets": {"ttft_off_over_on": 3.0, "tok_s_on_over_off": 1.0, "hit_rate": 0.7},
        "workload": {"adapters": NUM_ADAPTERS, "clients": args.clients, "turns": NUM_TURNS,
                     "system_tokens": SYSTEM_TOKENS, "new_tokens": NEW_TOKENS, "server_args": SERVER_ARGS,
                     "server_threads": args.threads},
    }
    path = write_result("bench_prefix", result)
    met = (result["ttft_speedup"] >= 3.0 and result["tok_s_ratio"] >= 1.0 and on["hit_rate"] >= 0.7
           and on["errors"] == off["errors"] == 0)
    print(f"  ttft off/on = {result['ttft_speedup']:.1f} (target >= 3), tok/s on/off = {result['tok_s_ratio']:.2f} "
          f"(target >= 1), targets {'met' if met else 'NOT met'}; {path}")
    print(f"bench-prefix: ttft_p50_on_ms={on['ttft_p50_ms']:.0f} ttft_p50_off_ms={off['ttft_p50_ms']:.0f} "
          f"hit_rate={on['hit_rate']:.2f} tok_s_on={on['tok_s']:.1f} tok_s_off={off['tok_s']:.1f}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
