"""`make bench-soak`: mixed traffic against a real server on the default model for ten
minutes (`--duration` for shorter), then a look at what it left behind.

Traffic, all at once: chat and generate, streaming and not, on the base model and several
adapters; clients that disconnect mid-stream; an admin who uploads an adapter, replaces it
and deletes it while requests on it run; a few hostile requests; /health polled every
100 ms. Afterwards, with the server idle: KV blocks still in use, adapter leases still
held, RSS growth since the warm-up (measured from after the CPU tier's arena has been
faulted in ahead, which it does by design up to --cpu-prefault-bytes), and the p99 of /health.

Errors counts only 5xx answers and broken streams (no final event, or an error event) on
valid requests; a 404 on the adapter being deleted is not an error. Targets: errors = 0,
leaked_kv_blocks = 0, leaked_leases = 0, rss_growth_mb <= 200, health_p99_ms <= 500.

Last line: soak: requests=N errors=E leaked_kv_blocks=K leaked_leases=L rss_growth_mb=M health_p99_ms=H
Result: bench/results/bench_soak.json (with the CPU's flags, as every result: bench/common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import TOPICS, make_bench_adapters, write_result
from loramux.server.model_fetch import default_model_dir

API_KEY = "soak-user"
ADMIN_KEY = "soak-admin"
NUM_USERS = 6  # concurrent well-behaved clients
NUM_ADAPTERS = 4  # stable adapters (the churned one comes and goes on top)
CHURN_ID = "soak-churn"
SERVER_ARGS = ["--max-loras", "4", "--max-lora-rank", "16", "--kv-cache-bytes", "512M", "--max-model-len", "1024",
               "--threads", "2", "--log-level", "warning", "--api-key", API_KEY, "--admin-api-key", ADMIN_KEY]
HEALTH_INTERVAL_S = 0.1


@dataclass
class Tally:
    requests: int = 0
    errors: int = 0  # 5xx or broken streams on valid requests
    error_samples: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    hostile_refused: int = 0
    hostile_5xx: int = 0
    not_found_on_churn: int = 0
    disconnects: int = 0
    uploads: int = 0
    deletions: int = 0
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0

    def count(self, kind: str) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 20:
            self.error_samples.append(what[:300])


# --------------------------------------------------------------------------- clients


def _question(rng: random.Random) -> str:
    return f"In two sentences, what is {rng.choice(TOPICS)}?"


def _model(rng: random.Random, adapters: list[str]) -> str | None:
    roll = rng.random()
    if roll < 0.25:
        return None  # base
    if roll < 0.40:
        return CHURN_ID
    return rng.choice(adapters)


async def _openai_stream(http: httpx.AsyncClient, path: str, body: dict, tally: Tally, churn: bool) -> None:
    async with http.stream("POST", path, json=body) as r:
        if r.status_code == 404 and churn:
            tally.not_found_on_churn += 1
            await r.aread()
            return
        if r.status_code >= 500:
            tally.error(f"{path} stream {r.status_code}: {(await r.aread())[:200]!r}")
            return
        if r.status_code != 200:
            tally.error(f"{path} stream answered {r.status_code}: {(await r.aread())[:200]!r}")
            return
        finished, done = False, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                tally.error(f"{path} error event: {payload[:200]}")
                return
            finished = finished or any(c.get("finish_reason") for c in event.get("choices", []))
        if not (finished and done):
            tally.error(f"{path} stream broken (finished={finished}, done={done})")


async def _tgi_stream(http: httpx.AsyncClient, body: dict, tally: Tally, churn: bool) -> None:
    async with http.stream("POST", "/generate_stream", json=body) as r:
        if r.status_code == 404 and churn:
            tally.not_found_on_churn += 1
            await r.aread()
            return
        if r.status_code != 200:
            tally.error(f"/generate_stream answered {r.status_code}: {(await r.aread())[:200]!r}")
            return
        final = False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):])
            if "error" in event:
                tally.error(f"/generate_stream error event: {line[:200]}")
                return
            final = event.get("generated_text") is not None
        if not final:
            tally.error("/generate_stream ended without its final event")


async def _plain(http: httpx.AsyncClient, path: str, body: dict, tally: Tally, churn: bool) -> None:
    r = await http.post(path, json=body)
    if r.status_code == 404 and churn:
        tally.not_found_on_churn += 1
    elif r.status_code != 200:
        tally.error(f"{path} answered {r.status_code}: {r.text[:200]}")


async def user(http: httpx.AsyncClient, seed: int, adapters: list[str], deadline: float, tally: Tally) -> None:
    """A well-behaved client: chat or generate, streaming or not, base or an adapter."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        model = _model(rng, adapters)
        churn = model == CHURN_ID
        max_tokens = rng.randint(8, 48)
        stream = rng.random() < 0.5
        api = rng.choice(("chat", "completions", "generate"))
        tally.count(f"{api}{'-stream' if stream else ''}")
        try:
            if api == "generate":
                body = {"inputs": _question(rng), "parameters": {"max_new_tokens": max_tokens, "adapter_id": model}}
                if stream:
                    await _tgi_stream(http, body, tally, churn)
                else:
                    await _plain(http, "/generate", body, tally, churn)
                continue
            body = {"model": model or "", "max_tokens": max_tokens, "stream": stream,
                    "temperature": rng.choice((0.0, 0.8)), "n": rng.choice((1, 1, 1, 2))}
            if api == "chat":
                body["messages"] = [{"role": "user", "content": _question(rng)}]
                path = "/v1/chat/completions"
            else:
                body["prompt"] = _question(rng)
                path = "/v1/completions"
            if stream:
                await _openai_stream(http, path, body, tally, churn)
            else:
                await _plain(http, path, body, tally, churn)
        except httpx.HTTPError as exc:
            tally.error(f"{api}: {type(exc).__name__}: {exc}")


async def disconnector(http: httpx.AsyncClient, seed: int, adapters: list[str], deadline: float, tally: Tally) -> None:
    """Starts long streams and walks away after a few events."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        tally.count("disconnect")
        body = {"model": rng.choice(adapters), "prompt": _question(rng), "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        try:
            async with http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    tally.error(f"disconnector answered {r.status_code}")
                    continue
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= rng.randint(2, 6):
                        break
            tally.disconnects += 1
        except httpx.HTTPError as exc:
            tally.error(f"disconnector: {type(exc).__name__}: {exc}")
        await asyncio.sleep(rng.uniform(0.2, 1.0))


def _adapter_files(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (name, (directory / name).read_bytes()))
            for name in ("adapter_config.json", "adapter_model.safetensors")]


async def admin(http: httpx.AsyncClient, versions: list[Path], deadline: float, tally: Tally) -> None:
    """Upload the churned adapter, replace it while it is used, delete it while it is used."""
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    step = 0
    while time.monotonic() < deadline:
        source = versions[step % len(versions)]
        tally.count("upload")
        try:
            r = await http.post("/v1/adapters", data={"adapter_id": CHURN_ID}, files=_adapter_files(source),
                                headers=headers)
            if r.status_code != 201:
                tally.error(f"upload answered {r.status_code}: {r.text[:200]}")
            else:
                tally.uploads += 1
            await asyncio.sleep(rng.uniform(1.0, 3.0))
            if step % 3 == 2:  # every third round: delete it while requests on it run
                tally.count("delete")
                r = await http.delete(f"/v1/adapters/{CHURN_ID}", headers=headers)
                if r.status_code != 200:
                    tally.error(f"delete answered {r.status_code}: {r.text[:200]}")
                else:
                    tally.deletions += 1
                await asyncio.sleep(rng.uniform(1.0, 2.0))
        except httpx.HTTPError as exc:
            tally.error(f"admin: {type(exc).__name__}: {exc}")
        step += 1


HOSTILE = [
    ("/v1/completions", {"content": b'{"prompt": "' + b"a" * (5 << 20) + b'"}',
                         "headers": {"content-type": "application/json"}}),
    ("/v1/completions", {"content": b'{"prompt": "x", "temperature": NaN}', "headers": {"content-type": "application/json"}}),
    ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "x"}],
                                       "chat_template": "{% for i in range(10**9) %}x{% endfor %}"}}),
    ("/v1/completions", {"json": {"prompt": "word " * 600_000}}),
    ("/v1/completions", {"json": {"prompt": [1, 10**9]}}),
    ("/v1/completions", {"json": {"prompt": "x", "stop": [str(i) for i in range(1000)]}}),
    ("/generate", {"json": {"inputs": "x", "parameters": {"seed": 2**80}}}),
    ("/v1/completions", {"json": {"prompt": ["x"] * 64, "n": 16}}),
    ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}}),
]


async def hostile(http: httpx.AsyncClient, deadline: float, tally: Tally) -> None:
    rng = random.Random(11)
    while time.monotonic() < deadline:
        path, kwargs = rng.choice(HOSTILE)
        tally.count("hostile")
        try:
            r = await http.post(path, **kwargs)
            if r.status_code >= 500:
                tally.hostile_5xx += 1
                tally.error(f"hostile {path} answered {r.status_code}: {r.text[:200]}")
            elif 400 <= r.status_code < 500:
                tally.hostile_refused += 1
            else:
                tally.error(f"hostile {path} was accepted ({r.status_code})")
        except httpx.HTTPError as exc:
            tally.error(f"hostile: {type(exc).__name__}: {exc}")
        await asyncio.sleep(rng.uniform(1.0, 3.0))


async def health(url: str, deadline: float, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                if (await http.get("/health")).status_code != 200:
                    tally.health_failures += 1
            except httpx.HTTPError:
                tally.health_failures += 1
            elapsed = time.perf_counter() - started
            tally.health_ms.append(elapsed * 1e3)
            await asyncio.sleep(max(0.0, HEALTH_INTERVAL_S - elapsed))


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, adapter_dir: Path, upload_dir: Path, port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "loramux.server.cli", "serve", "--model", str(model_dir), "--served-model-name", "base",
         "--adapter-dir", str(adapter_dir), "--upload-dir", str(upload_dir), "--port", str(port), *SERVER_ARGS],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not become healthy in 300 s")


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident memory and its parts (anonymous, file-backed, shared), MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = int(value.split()[0]) / 1024
    if "VmRSS" not in fields:
        raise RuntimeError("no VmRSS")
    return fields


def metric_sum(metrics_text: str, name: str, label: str = "") -> float:
    return sum(float(line.split()[-1]) for line in metrics_text.splitlines()
               if line.startswith(name) and label in line and not line.startswith("#"))


def arena_faulted(url: str) -> tuple[float, float]:
    """(faulted, prefault target) bytes of the CPU tier's arena; (0, 0) without one."""
    metrics = httpx.get(f"{url}/metrics").text
    return (metric_sum(metrics, "loramux_cpu_arena_bytes", 'state="faulted"'),
            metric_sum(metrics, "loramux_cpu_arena_bytes", 'state="prefault_target"'))


def wait_for_prefault(url: str, timeout_s: float = 120.0) -> None:
    """The idle loader faults the CPU tier's memory in ahead of loads (by design, bounded
    by --cpu-prefault-bytes); RSS is measured from after that, so growth means a leak."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        faulted, target = arena_faulted(url)
        if faulted >= target:
            return
        time.sleep(0.5)
    print(f"warning: the CPU tier's prefault did not finish within {timeout_s:.0f} s")


def leftovers(url: str) -> dict:
    """What the idle server still holds: KV blocks, adapter leases, running requests."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    info = httpx.get(f"{url}/info").json()
    metrics = httpx.get(f"{url}/metrics").text

    def sample(name: str, label: str = "") -> float:
        return metric_sum(metrics, name, label)

    usage = sample("vllm:kv_cache_usage_perc")
    adapters = httpx.get(f"{url}/v1/adapters", headers=headers).json()["data"]
    return {
        "kv_usage": usage,
        "leaked_kv_blocks": round(usage * info["kv_cache_blocks"]),
        "leased_slots": sample("loramux_adapter_slots", 'state="leased"'),
        "adapter_leases": sum(a["running_requests"] for a in adapters),
        "running": sample("vllm:num_requests_running"),
        "waiting": sample("vllm:num_requests_waiting"),
    }


async def traffic(url: str, adapters: list[str], versions: list[Path], seconds: float, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=NUM_USERS + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits) as http:
        await asyncio.gather(
            *(user(http, seed, adapters, deadline, tally) for seed in range(NUM_USERS)),
            disconnector(http, 99, adapters, deadline, tally),
            admin(http, versions, deadline, tally),
            hostile(http, deadline, tally),
            health(url, deadline, tally),
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    parser.add_argument("--no-result", action="store_true", help="do not write bench/results/bench_soak.json")
    args = parser.parse_args(argv)
    model_dir = default_model_dir()
    warmup_s = min(60.0, max(5.0, 0.1 * args.duration))
    with tempfile.TemporaryDirectory(prefix="loramux-soak-") as tmp:
        root = Path(tmp)
        adapter_dir, spare_dir, upload_dir = root / "adapters", root / "spare", root / "uploads"
        for d in (adapter_dir, spare_dir, upload_dir):
            d.mkdir()
        adapters = make_bench_adapters(model_dir, adapter_dir, "soak", [8, 16, 4, 8][:NUM_ADAPTERS], seed=100)
        versions = [spare_dir / n for n in make_bench_adapters(model_dir, spare_dir, "churn", [8, 16], seed=200)]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = root / "server.log"
        server = start_server(model_dir, adapter_dir, upload_dir, port, log)
        try:
            warm = Tally()
            asyncio.run(traffic(url, adapters, versions, warmup_s, warm))
            wait_for_prefault(url)
            dtype = httpx.get(f"{url}/info").json().get("model_dtype")  # what --dtype auto chose
            time.sleep(1.0)
            memory_start = memory_mb(server.pid)
            rss_start = memory_start["VmRSS"]
            arena_start, _ = arena_faulted(url)
            tally = Tally()
            started = time.monotonic()
            asyncio.run(traffic(url, adapters, versions, args.duration, tally))
            elapsed = time.monotonic() - started
            time.sleep(2.0)  # aborted streams and deletions settle
            left = leftovers(url)
            memory_end = memory_mb(server.pid)
            rss_end = memory_end["VmRSS"]
            arena_end, _ = arena_faulted(url)
            alive = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        if warm.errors:
            tally.error_samples[:0] = [f"(warm-up) {e}" for e in warm.error_samples[:5]]
        errors = tally.errors + warm.errors + (0 if alive else 1)
        leaked_leases = int(left["leased_slots"] + left["adapter_leases"])
        health_p99 = percentile(tally.health_ms, 0.99)
        result = {
            "duration_s": round(elapsed, 1),
            "warmup_s": warmup_s,
            "requests": tally.requests,
            "requests_by_kind": tally.by_kind,
            "errors": errors,
            "error_samples": tally.error_samples,
            "hostile_refused": tally.hostile_refused,
            "hostile_5xx": tally.hostile_5xx,
            "not_found_on_deleted_adapter": tally.not_found_on_churn,
            "disconnects": tally.disconnects,
            "uploads": tally.uploads,
            "deletions": tally.deletions,
            "leftovers": left,
            "leaked_kv_blocks": left["leaked_kv_blocks"],
            "leaked_leases": leaked_leases,
            "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_end, 1),
            "rss_growth_mb": round(rss_end - rss_start, 1),
            "memory_start_mb": {k: round(v, 1) for k, v in memory_start.items()},
            "memory_end_mb": {k: round(v, 1) for k, v in memory_end.items()},
            "cpu_arena_faulted_start_mb": round(arena_start / 2**20, 1),
            "cpu_arena_faulted_end_mb": round(arena_end / 2**20, 1),
            "health_polls": len(tally.health_ms),
            "health_failures": tally.health_failures,
            "health_p50_ms": round(percentile(tally.health_ms, 0.5), 1),
            "health_p99_ms": round(health_p99, 1),
            "health_max_ms": round(max(tally.health_ms, default=0.0), 1),
            "server_alive_at_end": alive,
            "server_args": SERVER_ARGS,
            "dtype": dtype,
            "targets": {"errors": 0, "leaked_kv_blocks": 0, "leaked_leases": 0, "rss_growth_mb": 200,
                        "health_p99_ms": 500},
        }
        if not args.no_result:
            print(f"wrote {write_result('bench_soak', result)}")
        for sample in tally.error_samples[:10]:
            print(f"error: {sample}")
    print(f"soak: requests={tally.requests} errors={errors} leaked_kv_blocks={left['leaked_kv_blocks']} "
          f"leaked_leases={leaked_leases} rss_growth_mb={rss_end - rss_start:.1f} health_p99_ms={health_p99:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
