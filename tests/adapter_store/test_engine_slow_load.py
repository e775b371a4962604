"""A slow adapter load does not stall the engine: other requests keep producing tokens.

A full engine (server.builder.build_engine) over a tiny random Llama with a real
AdapterStore whose disk read is held for one adapter ("slow") until the test releases it.
While it is held, a base request and a request for an adapter already on the device
("warm") run to completion; once released, the slow adapter's request completes with
exactly the tokens it produces when run alone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from loramux.adapter_store.config import AdapterStoreConfig
from loramux.adapter_store.format import load_adapter
from loramux.scheduler.sampling_params import SamplingParams
from loramux.server.builder import EngineParts, build_engine
from loramux.server.config import CacheConfig, LoramuxConfig, LoraSlotsConfig, ModelConfig
from loramux.server.engine import AsyncEngine
from loramux.server.offline import OfflineEngine, OfflineRequest
from tests.engine_fixtures import smol_tokenizer  # noqa: F401 (fixture)
from tests.peft_adapters import AdapterRecipe, make_peft_adapter
from tests.tiny_models import save_tiny_model

SLOW, WARM = "slow", "warm"
GREEDY = dict(temperature=0.0, ignore_eos=True)
HOLD_LIMIT_S = 30.0  # a held load gives up after this (the test failed long before)
STEP_LIMIT_S = 15.0  # any phase of a test that takes longer than this has failed


class HeldLoader:
    """A load_fn that holds the disk read of one adapter until `release` is set."""

    def __init__(self, held_id: str) -> None:
        self.held_id = held_id
        self.started = threading.Event()  # the held read has begun
        self.release = threading.Event()
        self.done = threading.Event()  # the held read has returned
        self.calls: list[str] = []

    def __call__(self, adapter_id, directory, spec, max_rank, dtype=torch.float32):
        self.calls.append(adapter_id)
        if adapter_id != self.held_id:
            return load_adapter(adapter_id, directory, spec, max_rank, dtype)
        self.started.set()
        try:
            assert self.release.wait(HOLD_LIMIT_S), "the held load was never released"
            return load_adapter(adapter_id, directory, spec, max_rank, dtype)
        finally:
            self.done.set()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, smol_tokenizer) -> tuple[Path, Path]:  # noqa: F811
    """(model dir with the default tokenizer, adapter dir holding `slow` and `warm`)."""
    root = tmp_path_factory.mktemp("slow-load")
    model_dir, adapter_dir = root / "model", root / "adapters"
    hf = save_tiny_model(model_dir, "llama", vocab_size=len(smol_tokenizer), max_position_embeddings=512)
    smol_tokenizer.save_pretrained(model_dir)
    adapter_dir.mkdir()
    make_peft_adapter(hf, AdapterRecipe(SLOW, r=8, seed=1, b_std=0.2), adapter_dir)
    make_peft_adapter(hf, AdapterRecipe(WARM, r=4, target_modules=["q_proj", "v_proj"], seed=2, b_std=0.3), adapter_dir)
    return model_dir, adapter_dir


@pytest.fixture
def engine(tiny_files):
    """(EngineParts, HeldLoader) with `warm` already on the device and `slow` cold."""
    model_dir, adapter_dir = tiny_files
    loader = HeldLoader(SLOW)
    config = LoramuxConfig(
        model=ModelConfig(model_dir=model_dir, served_model_name="tiny", max_model_len=512, dtype="float32"),
        lora=LoraSlotsConfig(max_loras=2, max_lora_rank=8),
        cache=CacheConfig(kv_cache_bytes=16 << 20),
        adapters=AdapterStoreConfig(adapter_dirs=(adapter_dir,)),
    )
    parts = build_engine(config, adapter_load_fn=loader)
    try:
        parts.store.prefetch(WARM)
        wait_until(lambda: parts.store.is_resident(WARM), "the warm adapter to load")
        yield parts, loader
    finally:
        loader.release.set()  # never leave the loader thread blocked
        parts.close()


def wait_until(condition, what: str, limit_s: float = STEP_LIMIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def requests(tokenizer) -> dict[str, tuple[list[int], str | None, int]]:
    """request id -> (prompt ids, adapter, max_tokens)."""

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    return {
        "slow": (ids("The quick brown fox jumps over"), SLOW, 12),
        "base": (ids("Hello there, how are you doing today?"), None, 16),
        "warm": (ids("Once upon a time in a land far away"), WARM, 20),
    }


def alone(parts: EngineParts, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    params = SamplingParams(max_tokens=max_tokens, **GREEDY)
    result = OfflineEngine(parts.core).generate([OfflineRequest(prompt, params, adapter)])[0]
    assert result.error is None, result.error
    return result.token_ids


def test_other_requests_finish_while_an_adapter_loads(engine, smol_tokenizer):  # noqa: F811
    parts, loader = engine
    core, store = parts.core, parts.store
    plan = requests(smol_tokenizer)
    for request_id, (prompt, adapter, max_tokens) in plan.items():
        core.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), adapter)
    loader.started.wait(STEP_LIMIT_S)
    assert loader.started.is_set(), "the slow adapter's load never started"

    tokens: dict[str, list[int]] = {request_id: [] for request_id in plan}
    finished: set[str] = set()

    def step() -> None:
        for output in core.step():
            assert output.error is None, output.error
            tokens[output.request_id] += output.new_token_ids
            if output.finished:
                finished.add(output.request_id)

    # Phase 1: the slow load is held; base and warm run to the end regardless.
    deadline = time.monotonic() + STEP_LIMIT_S
    while {"base", "warm"} - finished:
        assert time.monotonic() < deadline, f"base/warm stalled: {finished=}"
        step()
    assert not loader.done.is_set() and not store.is_resident(SLOW)
    assert tokens["slow"] == [] and "slow" not in finished
    assert len(tokens["base"]) == plan["base"][2] and len(tokens["warm"]) == plan["warm"][2]
    stats = store.stats()
    assert stats.num_loading == 1 and stats.loads == 1  # slow queued; only warm loaded

    # Phase 2: release the load; the slow adapter's request is admitted and completes.
    loader.release.set()
    deadline = time.monotonic() + STEP_LIMIT_S
    while "slow" not in finished:
        assert time.monotonic() < deadline, "the slow adapter's request never finished"
        step()
        time.sleep(0.001)  # waiting for the loader thread: do not spin the engine hot
    assert "slow" in finished and store.is_resident(SLOW)
    assert loader.calls.count(SLOW) == 1

    # Every request's tokens equal running it alone (all adapters are resident now).
    for request_id, (prompt, adapter, max_tokens) in plan.items():
        assert tokens[request_id] == alone(parts, prompt, adapter, max_tokens), request_id


def test_async_engine_streams_others_while_an_adapter_loads(engine, smol_tokenizer):  # noqa: F811
    """The same through the AsyncEngine's thread, as the server runs it."""
    parts, loader = engine
    plan = requests(smol_tokenizer)
    expected_others = {
        request_id: alone(parts, prompt, adapter, max_tokens)
        for request_id, (prompt, adapter, max_tokens) in plan.items()
        if adapter != SLOW
    }

    async def main() -> dict[str, list[int]]:
        async_engine = AsyncEngine(parts.core)
        async_engine.start()
        try:

            async def collect(request_id: str) -> list[int]:
                prompt, adapter, max_tokens = plan[request_id]
                params = SamplingParams(max_tokens=max_tokens, **GREEDY)
                out: list[int] = []
                async for output in async_engine.generate(request_id, prompt, params, adapter):
                    assert output.error is None, output.error
                    out += output.new_token_ids
                return out

            slow = asyncio.create_task(collect("slow"))
            others = {i: asyncio.create_task(collect(i)) for i in plan if i != "slow"}
            done = {i: await asyncio.wait_for(task, STEP_LIMIT_S) for i, task in others.items()}
            assert loader.started.is_set() and not loader.done.is_set()
            assert not slow.done() and not parts.store.is_resident(SLOW)
            loader.release.set()
            done["slow"] = await asyncio.wait_for(slow, STEP_LIMIT_S)
            return done
        finally:
            async_engine.shutdown()

    tokens = asyncio.run(main())
    for request_id, expected in expected_others.items():
        assert tokens[request_id] == expected, request_id
    prompt, adapter, max_tokens = plan["slow"]
    assert tokens["slow"] == alone(parts, prompt, adapter, max_tokens)
