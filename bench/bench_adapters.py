"""bench-adapters: adapter paging between disk, CPU RAM and the device's slots.

The default model (SmolLM2-135M-Instruct), fp32 on the CPU, 2 torch threads, 16 device
slots of rank <= 16, and r=16 all-linear PEFT adapters (made with peft: 19.6 MB in fp32).

  cold_ms           from `prefetch` of a registered adapter that is in neither the CPU tier
                    nor a slot (its files were read once before: the page cache is warm) to
                    the adapter being pinnable (`is_resident` true): the store's own
                    LoadEvent.queued_s, which spans the queue hand-off, the safetensors read
                    (copied out of the file's mapping into the CPU tier), validation and the
                    slot write. Median over 24 distinct adapters (copies
                    of one file, each its own directory and inode), slots full after the
                    16th, so most loads evict one. The loads start once the store's loader
                    has faulted in the CPU tier's memory ahead (cpu_prefault_bytes), as it
                    does while a server starts; `cold_max_ms` is the slowest of them.
  cpu_to_device_ms  the same for an adapter in the CPU tier whose slot was evicted
                    (3 rounds over the 24 adapters: every load comes from the CPU tier).
                    Both on a bare AdapterStore over the real model's slot buffers, with
                    its loader thread, fresh_grace_s=0 (nothing pins these adapters).
  zipf1000_vs_hot   tok/s of a Zipf(1.0) workload over 1,000 adapters through a full engine
                    (build_engine, max_loras=16, CPU tier 2 GiB = about 100 adapters, the
                    default scheduling settings) over tok/s of the same requests "hot".
                    1,000 x 19.6 MB does not fit this disk or RAM honestly, so the 1,000
                    adapters share one weights file (hard links), each with its own config
                    (its own lora_alpha, so they are distinct adapters to the store and the
                    outputs): every disk read hits the page cache, and the CPU tier still
                    holds a converted copy per adapter.
                    Workload: 256 requests (seed 0), adapter k drawn with P ~ 1/(k+1), short
                    prompts (10-15 tokens), exactly 32 new tokens (greedy, ignore_eos), all
                    submitted at once through the OfflineEngine; the scheduler admits what
                    is resident while the store loads the rest.
                    Hot: "all its adapters resident". 1,000 slots do not fit in RAM, but
                    only the adapters the requests use (141) matter: hot is a second engine
                    with a slot for each of them, all loaded before the runs, and its
                    scheduler's per-step limit kept at max_loras=16 distinct adapters, so
                    batches are formed under the same rules; only the loads, and the waits
                    for them, are missing. (Mapping the requests onto 16 adapters instead
                    would not keep the batch shapes: 64 requests a step instead of ~20.)
                    One warm-up of each (the Zipf one with another seed, so the CPU tier is
                    in a steady state), then 3 interleaved rounds; medians.
Last line: `bench-adapters: cold_ms=A cpu_to_device_ms=B zipf1000_vs_hot=C cold_max_ms=D`.
Targets: A <= 30, B <= 5, C >= 0.80, D <= 30 (every cold load, not only the median).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loramux.adapter_store.config import AdapterStoreConfig
from loramux.adapter_store.format import CONFIG_NAME, WEIGHTS_NAME
from loramux.adapter_store.stats import LoadEvent
from loramux.adapter_store.store import AdapterStore
from bench.common import TOPICS, median_min_max, timed, write_result
from loramux.kernels.backend import select_backend
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.builder import EngineParts, build_engine
from loramux.server.config import CacheConfig, LoramuxConfig, LoraSlotsConfig, ModelConfig
from loramux.server.model_fetch import default_model_dir
from loramux.server.models.loader import load_model
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.peft_adapters import AdapterRecipe, make_peft_adapter

RANK, SLOTS, NUM_ADAPTERS = 16, 16, 1000
DTYPE = torch.float32  # the serving dtype of every part (model, slots, CPU tier)
NUM_COLD, CPU_ROUNDS = 24, 3  # cold: distinct adapters (> SLOTS, so slots get evicted)
CPU_CACHE_BYTES = 2 << 30
ZIPF_S = 1.0
LOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Settings:
    num_requests: int = 256
    new_tokens: int = 32
    runs: int = 3
    num_cold: int = NUM_COLD
    cpu_rounds: int = CPU_ROUNDS
    warmup: bool = True


QUICK = Settings(num_requests=32, new_tokens=8, runs=1, num_cold=18, cpu_rounds=1, warmup=False)


# --------------------------------------------------------------------------- adapters


def make_adapter(model_dir: Path, out: Path) -> Path:
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    directory = make_peft_adapter(hf, AdapterRecipe("r16", r=RANK, lora_alpha=2 * RANK, seed=7, b_std=0.01), out)
    del hf
    return directory


def copy_adapters(source: Path, root: Path, names: list[str]) -> None:
    """Real copies (own inodes), each file read once so the page cache is warm, and
    written back to disk before any load is timed: otherwise the kernel's writeback of these
    ~470 MB runs during the first loads (on 2 cores, +5-10 ms on each of the first ~7)."""
    for name in names:
        (root / name).mkdir(parents=True)
        for file in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(source / file, root / name / file)
            (root / name / file).read_bytes()
    os.sync()


def link_adapters(source: Path, root: Path, count: int) -> list[str]:
    """`count` adapters sharing source's weights (hard links), each with its own lora_alpha."""
    config = json.loads((source / CONFIG_NAME).read_text())
    weights = source / WEIGHTS_NAME
    names = []
    for i in range(count):
        name = f"z{i:04d}"
        directory = root / name
        directory.mkdir(parents=True)
        (directory / CONFIG_NAME).write_text(json.dumps({**config, "lora_alpha": 2 * RANK * (0.5 + i / count)}))
        try:
            (directory / WEIGHTS_NAME).hardlink_to(weights)
        except OSError:
            os.symlink(weights, directory / WEIGHTS_NAME)
        names.append(name)
    weights.read_bytes()  # one inode: warm for all of them
    return names


# --------------------------------------------------------------------------- load latency


class LoadWaiter:
    """The store's on_load hook: hands each LoadEvent to the thread waiting for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: dict[str, LoadEvent] = {}

    def __call__(self, event: LoadEvent) -> None:
        with self._cond:
            self._events[event.adapter_id] = event
            self._cond.notify_all()

    def load(self, store: AdapterStore, adapter_id: str) -> LoadEvent:
        with self._cond:
            self._events.pop(adapter_id, None)
        store.prefetch(adapter_id)
        with self._cond:
            if not self._cond.wait_for(lambda: adapter_id in self._events, LOAD_TIMEOUT_S):
                raise RuntimeError(f"adapter {adapter_id!r} did not load in {LOAD_TIMEOUT_S} s")
            event = self._events.pop(adapter_id)
        if not event.ok or not store.is_resident(adapter_id):
            raise RuntimeError(f"adapter {adapter_id!r} failed to load: {event.error}")
        return event


def measure_loads(model_dir: Path, source: Path, root: Path, settings: Settings) -> dict:
    names = [f"c{i:02d}" for i in range(settings.num_cold)]
    copy_adapters(source, root, names)
    model = load_model(
        model_dir,
        select_backend(torch.device("cpu"), DTYPE, name="torch"),
        max_model_len=256,
        max_lora_slots=SLOTS,
        max_lora_rank=RANK,
    )
    waiter = LoadWaiter()
    config = AdapterStoreConfig(adapter_dirs=(root,), cpu_cache_bytes=CPU_CACHE_BYTES, fresh_grace_s=0.0)
    store = AdapterStore(
        config, model.spec.base_model_spec(), model.lora_buffers(), DTYPE, "cpu", on_load=waiter
    )
    gc.freeze()  # as `loramux serve` does once started: no full collection walks the model's objects
    with store:
        wait_for_prefault(store)
        cold = [waiter.load(store, name) for name in names]
        warm = [waiter.load(store, name) for _ in range(settings.cpu_rounds) for name in names]
        stats = store.stats()
        arena = store.arena_stats()
    assert all(e.source == "disk" for e in cold) and all(e.source == "cpu" for e in warm)
    adapter_bytes = stats.cpu_bytes // stats.num_cpu

    def summary(events: list[LoadEvent]) -> dict:
        return {
            "queued_ms": median_min_max([e.queued_s * 1e3 for e in events]),
            "load_ms": median_min_max([e.load_s * 1e3 for e in events]),  # without the hand-off
        }

    return {
        "adapter_bytes": adapter_bytes,
        "cold": summary(cold),
        "cpu_to_device": summary(warm),
        "device_evictions": stats.device_evictions,
        # Loads whose block reached past the memory faulted in ahead (fresh pages).
        "arena": {"allocations": arena.num_allocations, "unfaulted": arena.num_unfaulted,
                  "faulted_bytes": arena.faulted_bytes, "capacity_bytes": arena.capacity_bytes},
    }


def wait_for_prefault(store: AdapterStore, timeout_s: float = 120.0) -> None:
    """Until the loader has faulted in the CPU tier's memory ahead (it does while idle)."""
    deadline = time.monotonic() + timeout_s
    while (arena := store.arena_stats()).faulted_bytes < arena.prefault_target_bytes:
        if time.monotonic() > deadline:
            raise SystemExit("the store's loader did not fault in the CPU tier's memory in time")
        time.sleep(0.01)


# --------------------------------------------------------------------------- zipf workload


def short_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` distinct prompts of 10-15 tokens (no chat template)."""
    texts = [f"Tell me one fact about {TOPICS[i % len(TOPICS)]}, please (#{i})." for i in range(count)]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def zipf_adapters(count: int, seed: int) -> list[int]:
    weights = [1.0 / (k + 1) ** ZIPF_S for k in range(NUM_ADAPTERS)]
    return random.Random(seed).choices(range(NUM_ADAPTERS), weights=weights, k=count)


class StepCounter:
    """Wraps an EngineCore for the OfflineEngine: counts the steps that ran something and
    the requests they ran (steps that only waited for a load are not counted)."""

    def __init__(self, core) -> None:
        self.core = core
        self.steps = 0
        self.scheduled = 0
        self.busy_s = 0.0  # in steps that ran requests

    @property
    def last_step(self):
        return self.core.last_step

    def add_request(self, *args) -> None:
        self.core.add_request(*args)

    def step(self):
        started = time.perf_counter()
        outputs = self.core.step()
        if self.core.last_step.num_scheduled_requests:
            self.steps += 1
            self.scheduled += self.core.last_step.num_scheduled_requests
            self.busy_s += time.perf_counter() - started
        return outputs


def run_workload(parts: EngineParts, names: list[str], prompts, adapters: list[int], settings: Settings) -> dict:
    params = SamplingParams(max_tokens=settings.new_tokens, temperature=0.0, ignore_eos=True)
    requests = [OfflineRequest(p, params, names[a]) for p, a in zip(prompts, adapters)]
    counter = StepCounter(parts.core)
    before = parts.store.stats()
    seconds, results = timed(lambda: OfflineEngine(counter).generate(requests))
    after = parts.store.stats()
    for result in results:
        if result.error is not None or len(result.token_ids) != settings.new_tokens:
            raise RuntimeError(f"request {result.request_id} failed: {result.error}")
    return {
        "tok_s": len(requests) * settings.new_tokens / seconds,
        "seconds": seconds,
        "steps": counter.steps,  # steps that ran requests (not those waiting for a load)
        "requests_per_step": counter.scheduled / max(counter.steps, 1),
        "stalled_s": seconds - counter.busy_s,  # nothing to run: every request waited for a load
        "loads_from_disk": after.cpu_misses - before.cpu_misses,
        "loads_from_cpu": after.cpu_hits - before.cpu_hits,
        "device_evictions": after.device_evictions - before.device_evictions,
    }


def make_resident(parts: EngineParts, names: list[str]) -> None:
    for name in names:
        parts.store.prefetch(name)
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while not all(parts.store.is_resident(name) for name in names):
        if time.monotonic() > deadline:
            raise RuntimeError("the hot adapters did not become resident")
        time.sleep(0.01)
        for name in names:  # repeated, as the scheduler does: a prefetch expires unrepeated
            parts.store.prefetch(name)


def engine_config(model_dir: Path, root: Path, slots: int, cpu_cache_bytes: int) -> LoramuxConfig:
    return LoramuxConfig(
        model=ModelConfig(model_dir=model_dir, served_model_name="base", max_model_len=1024, num_threads=2,
                          dtype=str(DTYPE).removeprefix("torch.")),
        lora=LoraSlotsConfig(max_loras=slots, max_lora_rank=RANK),
        cache=CacheConfig(kv_cache_bytes=512 << 20),
        adapters=AdapterStoreConfig(adapter_dirs=(root,), cpu_cache_bytes=cpu_cache_bytes),
    )


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def measure_zipf(model_dir: Path, source: Path, root: Path, tokenizer, adapter_bytes: int, settings: Settings) -> dict:
    names = link_adapters(source, root, NUM_ADAPTERS)
    prompts = short_prompts(tokenizer, settings.num_requests)
    zipf = zipf_adapters(settings.num_requests, seed=0)
    used = sorted(set(zipf))
    needed = (len(used) + SLOTS) * adapter_bytes + CPU_CACHE_BYTES + (3 << 30)  # + models, KV caches
    if available_memory() < needed:
        raise SystemExit(f"the zipf part needs about {needed >> 30} GiB of RAM, {available_memory() >> 30} are available")
    paged = build_engine(engine_config(model_dir, root, SLOTS, CPU_CACHE_BYTES))
    # Hot: a slot for every adapter the workload uses, all loaded before, and the scheduler's
    # per-step limit kept at SLOTS distinct adapters, so batches are formed as in the paged
    # engine; only the loads (and waiting for them) are missing.
    hot = build_engine(engine_config(model_dir, root, len(used), 0))
    hot.core.scheduler.config = replace(hot.core.scheduler.config, max_loras=SLOTS)
    try:
        make_resident(hot, [names[k] for k in used])
        hot_loads = hot.store.stats().loads
        results: dict[str, list[dict]] = {"hot": [], "zipf": []}
        if settings.warmup:
            run_workload(hot, names, prompts, zipf, settings)  # the kernels, the allocator
            # Another seed: the paged engine's CPU tier and slots in a steady state.
            run_workload(paged, names, prompts, zipf_adapters(settings.num_requests, seed=1), settings)
        for i in range(settings.runs):  # interleaved, so drift hits both alike
            results["hot"].append(run_workload(hot, names, prompts, zipf, settings))
            results["zipf"].append(run_workload(paged, names, prompts, zipf, settings))
            hot_run, zipf_run = results["hot"][-1], results["zipf"][-1]
            print(
                f"  run {i + 1}: hot={hot_run['tok_s']:.1f} tok/s ({hot_run['steps']} steps of "
                f"{hot_run['requests_per_step']:.1f} requests), zipf={zipf_run['tok_s']:.1f} tok/s "
                f"({zipf_run['steps']} steps of {zipf_run['requests_per_step']:.1f}, {zipf_run['stalled_s']:.1f} s "
                f"stalled; {zipf_run['loads_from_disk']} disk + {zipf_run['loads_from_cpu']} cpu loads)",
                flush=True,
            )
        if hot.store.stats().loads != hot_loads:
            raise RuntimeError("the hot engine loaded an adapter during its runs")
        stats = paged.store.stats()
    finally:
        hot.close()
        paged.close()
    hot_tok_s = statistics.median(r["tok_s"] for r in results["hot"])
    zipf_tok_s = statistics.median(r["tok_s"] for r in results["zipf"])
    return {
        "hot_tok_s": hot_tok_s,
        "zipf_tok_s": zipf_tok_s,
        "ratio": zipf_tok_s / hot_tok_s,
        "distinct_adapters": len(used),
        "runs": results,
        "store_load_latency_ms_median": statistics.median(stats.load_latency_s) * 1e3 if stats.load_latency_s else None,
    }


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--quick", action="store_true", help="a smoke run: few requests, few repeats")
    parser.add_argument("--workdir", type=Path, default=None, help="where the adapters go (default: a temp dir)")
    parser.add_argument("--requests", type=int, default=None, help="zipf requests (default 256, quick 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 32, quick 8)")
    parser.add_argument("--runs", type=int, default=None, help="interleaved hot/zipf rounds (default 3)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    overrides = {"num_requests": args.requests, "new_tokens": args.new_tokens, "runs": args.runs}
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    load_at_start = os.getloadavg()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        free = shutil.disk_usage(tmp).free
        needed = (settings.num_cold + 2) * 20_000_000
        if free < needed + (1 << 30):
            raise SystemExit(f"bench-adapters needs about {needed >> 20} MiB in {tmp}, {free >> 20} MiB are free")
        source = make_adapter(args.model_dir, tmp / "source")
        print(f"  adapter: r={RANK} all-linear, {(source / WEIGHTS_NAME).stat().st_size / 1e6:.1f} MB of safetensors; "
              f"{settings.num_cold} copies for the load latency, {NUM_ADAPTERS} hard links (own configs) for zipf",
              flush=True)
        loads = measure_loads(args.model_dir, source, tmp / "cold", settings)
        gc.collect()
        cold = loads["cold"]["queued_ms"]["median"]
        cold_max = loads["cold"]["queued_ms"]["max"]
        cpu = loads["cpu_to_device"]["queued_ms"]["median"]
        print(f"  cold: {cold:.1f} ms (load {loads['cold']['load_ms']['median']:.1f}), cpu->device: {cpu:.1f} ms "
              f"(load {loads['cpu_to_device']['load_ms']['median']:.1f}), medians", flush=True)
        zipf = measure_zipf(args.model_dir, source, tmp / "zipf", tokenizer, loads["adapter_bytes"], settings)
    ratio = zipf["ratio"]
    result = {
        "dtype": str(DTYPE).removeprefix("torch."),
        "settings": {**settings.__dict__, "quick": args.quick, "slots": SLOTS, "rank": RANK,
                     "num_adapters": NUM_ADAPTERS, "zipf_s": ZIPF_S, "cpu_cache_bytes": CPU_CACHE_BYTES},
        "loads": loads,
        "zipf": zipf,
        "notes": {
            "adapters": f"one r={RANK} all-linear peft adapter; {settings.num_cold} real copies for the load latency; "
            f"{NUM_ADAPTERS} hard links of its weights, each with its own config (lora_alpha), for zipf",
            "hot": "the same requests on an engine with a slot for each adapter they use, all loaded before "
            f"the run, and the scheduler's per-step limit kept at max_loras={SLOTS} (same batching rules, no loads)",
            "arrival": "all requests submitted at once (OfflineEngine)",
        },
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
    }
    defaults = settings == Settings()
    where = write_result("bench_adapters", result) if defaults else "not written (not the default settings)"
    print(f"  hot={zipf['hot_tok_s']:.1f} zipf={zipf['zipf_tok_s']:.1f} tok/s, {zipf['distinct_adapters']} distinct "
          f"adapters; targets: cold <= 30 ms (every load), cpu->device <= 5 ms, zipf/hot >= 0.80; results {where}")
    print(f"bench-adapters: cold_ms={cold:.1f} cpu_to_device_ms={cpu:.1f} zipf1000_vs_hot={ratio:.2f} "
          f"cold_max_ms={cold_max:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
