"""`make bench-replicas`: two loramux replicas behind Ray Serve, adapter-affine routing
against round-robin, side by side on one workload.

The workload: Zipf(1.0) over 200 adapters (rank 8, attention q/v: small, so every replica's
CPU tier holds them all and a cold load is exactly "this replica reads the adapter from
disk for the first time"), short prompts, a few generated tokens, 8 clients at once. Each
routing gets a fresh app (`loramux-ray`, a local Ray cluster), so both start cold.

  affine       Serve's model multiplexing keyed by adapter id (deploy/ray)
  round_robin  the same app with routing by adapter switched off: Serve spreads requests
               without regard to adapters, as a plain load balancer does

Cold loads are read from every replica's /metrics: loramux_adapter_load_seconds_count
with source="disk", summed over the replicas. Target: cold_loads_affine <= cold_loads_rr / 1.5.
Last line: `bench-replicas: affine_tok_s=A round_robin_tok_s=B ratio=A/B cold_loads_affine=C cold_loads_rr=D`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from loramux.adapter_store.format import CONFIG_NAME, WEIGHTS_NAME
from loramux.server.model_fetch import default_model_dir

RESULTS_NAME = "bench_replicas"
STARTUP_TIMEOUT_S = 900.0
RANK = 8
# Small replicas for a small machine: one engine thread each, a modest KV cache.
REPLICA_SERVER_ARGS = ("--threads", "1", "--max-loras", "8", "--max-lora-rank", "16", "--kv-cache-bytes", "256M",
                       "--max-model-len", "512", "--log-level", "warning")
PROMPT = "Write one word about the sea:"


# --------------------------------------------------------------------------- the app


@dataclass
class RayApp:
    url: str
    state_dir: Path
    process: subprocess.Popen
    log_path: Path

    def log(self, tail: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def replicas(self) -> list[dict]:
        from loramux.ray_serve.adapter_dir import SharedAdapterDir

        return SharedAdapterDir(self.state_dir).live_replicas()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(routing: str, state_dir: Path, adapter_dir: Path | None, num_replicas: int = 2,
              server_args: tuple[str, ...] = REPLICA_SERVER_ARGS, env: dict[str, str] | None = None,
              timeout_s: float = STARTUP_TIMEOUT_S) -> RayApp:
    """`loramux-ray` as a user runs it, on a free port; returns when the front door answers."""
    port = _free_port()
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "loramux-ray.log"
    command = [sys.executable, "-m", "loramux.ray_serve.cli", "--replicas", str(num_replicas), "--routing", routing,
               "--port", str(port), "--num-cpus", str(max(num_replicas, os.cpu_count() or 1)),
               "--state-dir", str(state_dir)]
    if adapter_dir is not None:
        command += ["--adapter-dir", str(adapter_dir)]
    command += ["--", "--model", str(default_model_dir()), *server_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   start_new_session=True)
    app = RayApp(f"http://127.0.0.1:{port}", state_dir, process, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"loramux-ray exited with {process.returncode}:\n{app.log()}")
        if "serving on" in app.log(20000):
            try:
                if httpx.get(f"{app.url}/health", timeout=10).status_code == 200 and len(app.replicas()) == num_replicas:
                    return app
            except httpx.HTTPError:
                pass
        time.sleep(1.0)
    stop_app(app)
    raise TimeoutError(f"loramux-ray did not come up in {timeout_s:.0f} s:\n{app.log()}")


def stop_app(app: RayApp, grace_s: float = 90.0) -> None:
    """SIGTERM (Serve and Ray shut down, replicas stop their servers); SIGKILL the group after grace_s."""
    if app.process.poll() is None:
        app.process.send_signal(signal.SIGTERM)
        try:
            app.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(app.process.pid, signal.SIGKILL)
            app.process.wait(10)


# --------------------------------------------------------------------------- adapters and workload


def make_adapters(out: Path, count: int, seed: int = 7) -> list[str]:
    """`count` distinct adapters for the default model: one random rank-8 q/v adapter, then
    copies that share its weights file (hard links) with a different lora_alpha each."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.peft_adapters import AdapterRecipe, make_peft_adapter

    out.mkdir(parents=True, exist_ok=True)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32)
    source = make_peft_adapter(hf, AdapterRecipe("source", r=RANK, target_modules=["q_proj", "v_proj"],
                                                 lora_alpha=2 * RANK, seed=seed, b_std=0.01), out / ".source")
    del hf
    config = json.loads((source / CONFIG_NAME).read_text())
    names = []
    for i in range(count):
        name = f"a{i:03d}"
        directory = out / name
        directory.mkdir(exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": RANK * (1 + i / count)}))
        target = directory / WEIGHTS_NAME
        if not target.exists():
            try:
                target.hardlink_to(source / WEIGHTS_NAME)
            except OSError:
                target.write_bytes((source / WEIGHTS_NAME).read_bytes())
        names.append(name)
    return names


def zipf_sequence(names: list[str], count: int, s: float = 1.0, seed: int = 0) -> list[str]:
    weights = [1.0 / (k + 1) ** s for k in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


@dataclass(frozen=True)
class Outcome:
    adapter: str
    status: int
    replica: str | None
    tokens: int
    seconds: float


def one_request(client: httpx.Client, adapter: str, max_tokens: int) -> Outcome:
    started = time.perf_counter()
    try:
        r = client.post("/v1/completions", json={"model": adapter, "prompt": PROMPT, "max_tokens": max_tokens,
                                                  "ignore_eos": True, "temperature": 0})
    except httpx.HTTPError:
        return Outcome(adapter, 0, None, 0, time.perf_counter() - started)
    tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
    return Outcome(adapter, r.status_code, r.headers.get("x-loramux-replica"), tokens, time.perf_counter() - started)


def run_workload(url: str, sequence: list[str], concurrency: int, max_tokens: int,
                 headers: dict[str, str] | None = None) -> tuple[list[Outcome], float]:
    """Every adapter id of `sequence`, one request each, `concurrency` clients; (outcomes, wall s)."""
    clients = [httpx.Client(base_url=url, timeout=600, headers=headers or {}) for _ in range(concurrency)]
    started = time.perf_counter()
    try:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            futures = [pool.submit(one_request, clients[i % concurrency], adapter, max_tokens)
                       for i, adapter in enumerate(sequence)]
            outcomes = [f.result() for f in futures]
    finally:
        for client in clients:
            client.close()
    return outcomes, time.perf_counter() - started


def disk_loads(app: RayApp) -> dict[str, int]:
    """Per live replica: adapters its server read from disk (loramux_adapter_load_seconds_count{source="disk"})."""
    from prometheus_client.parser import text_string_to_metric_families

    loads = {}
    for replica in app.replicas():
        text = httpx.get(f"{replica['url']}/metrics", timeout=30).text
        count = 0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "loramux_adapter_load_seconds_count" and sample.labels.get("source") == "disk":
                    count += int(sample.value)
        loads[replica["replica"]] = count
    return loads


def affinity(outcomes: list[Outcome]) -> float:
    """Share of requests served by their adapter's most used replica (1.0 = perfectly affine)."""
    by_adapter: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        if o.replica:
            by_adapter[o.adapter][o.replica] += 1
    total = sum(sum(c.values()) for c in by_adapter.values())
    return sum(c.most_common(1)[0][1] for c in by_adapter.values()) / max(1, total)


# --------------------------------------------------------------------------- the benchmark


def measure(routing: str, root: Path, adapter_dir: Path, sequence: list[str], args) -> dict:
    app = start_app(routing, root / f"state-{routing}", adapter_dir, num_replicas=args.replicas)
    try:
        # One base request per client first: the servers' first-request costs are not the adapters'.
        run_workload(app.url, [default_model_dir().name] * args.concurrency, args.concurrency, 1)
        outcomes, wall = run_workload(app.url, sequence, args.concurrency, args.max_tokens)
        loads = disk_loads(app)
    finally:
        stop_app(app)
    failed = [o for o in outcomes if o.status != 200]
    tokens = sum(o.tokens for o in outcomes)
    latencies = sorted(o.seconds for o in outcomes)
    result = {
        "routing": routing,
        "requests": len(outcomes),
        "failed": len(failed),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2),
        "req_s": round(len(outcomes) / wall, 2),
        "p50_s": round(latencies[len(latencies) // 2], 4),
        "p99_s": round(latencies[int(len(latencies) * 0.99) - 1], 4),
        "cold_loads": sum(loads.values()),
        "cold_loads_per_replica": loads,
        "distinct_adapters": len(set(sequence)),
        "affinity": round(affinity(outcomes), 4),
    }
    print(f"  {routing:12s} {result['tok_s']:8.1f} tok/s  {result['req_s']:6.1f} req/s  cold loads "
          f"{result['cold_loads']:4d} {loads}  affinity {result['affinity']:.3f}  failed {len(failed)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where adapters and replica state go (default: a temp dir)")
    args = p.parse_args(argv)

    from bench.common import write_result

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    root.mkdir(parents=True, exist_ok=True)
    adapter_dir = root / "adapters"
    names = make_adapters(adapter_dir, args.adapters)
    sequence = zipf_sequence(names, args.requests, args.zipf, args.seed)
    print(f"bench-replicas: {args.requests} requests, Zipf({args.zipf}) over {args.adapters} adapters "
          f"({len(set(sequence))} distinct), {args.replicas} replicas, {args.concurrency} clients", flush=True)
    results = {routing: measure(routing, root, adapter_dir, sequence, args) for routing in ("affine", "round_robin")}
    a, rr = results["affine"], results["round_robin"]
    ratio = a["tok_s"] / rr["tok_s"] if rr["tok_s"] else float("inf")
    target_met = a["cold_loads"] <= rr["cold_loads"] / 1.5
    path = write_result(RESULTS_NAME, {
        "workload": {"adapters": args.adapters, "requests": args.requests, "zipf_s": args.zipf,
                     "concurrency": args.concurrency, "max_tokens": args.max_tokens, "replicas": args.replicas,
                     "seed": args.seed, "replica_server_args": list(REPLICA_SERVER_ARGS)},
        "affine": a, "round_robin": rr, "ratio": round(ratio, 3),
        "target": "cold_loads_affine <= cold_loads_rr / 1.5", "target_met": target_met,
        "cpu_count": os.cpu_count(),
    })
    print(f"  result: {path}  target (C <= D/1.5) {'met' if target_met else 'NOT met'}")
    print(f"bench-replicas: affine_tok_s={a['tok_s']:.1f} round_robin_tok_s={rr['tok_s']:.1f} ratio={ratio:.2f} "
          f"cold_loads_affine={a['cold_loads']} cold_loads_rr={rr['cold_loads']}")
    return 0 if target_met and not a["failed"] and not rr["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
