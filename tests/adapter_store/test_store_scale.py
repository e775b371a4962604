"""10,000 adapters on disk register in seconds, reading configs and sizes only."""

from __future__ import annotations

import time
import tracemalloc

from loramux.adapter_store import format as adapter_format
from tests.adapter_store.store_fixtures import (
    CountingLoader,
    make_store,
    write_adapter,
    write_many,
)

NUM_ADAPTERS = 10_000


def test_ten_thousand_adapters_register_fast_in_bounded_memory(tmp_path, monkeypatch):
    source = write_adapter(tmp_path, "source")
    root = tmp_path / "many"
    root.mkdir()
    write_many(root, NUM_ADAPTERS, source)  # one shared (hard-linked) weights file

    def no_weights(*args, **kwargs):
        raise AssertionError("registration read weights")

    monkeypatch.setattr(adapter_format, "_read_weights", no_weights)
    loader = CountingLoader()
    store = make_store(root, max_slots=4, load_fn=loader)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        store.start(run_loader=False)
        elapsed = time.perf_counter() - start  # ~2 s under tracemalloc on a CI core
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 30.0
    assert peak < 64 << 20, f"{peak / 2**20:.1f} MiB for {NUM_ADAPTERS} adapters"
    assert loader.calls == {}

    stats = store.stats()
    assert stats.num_registered == NUM_ADAPTERS and stats.num_cpu == stats.num_device == 0
    assert stats.disk_bytes == NUM_ADAPTERS * store.info("a0").disk_bytes
    start = time.perf_counter()
    infos = store.list()
    assert time.perf_counter() - start < 5.0
    assert len(infos) == NUM_ADAPTERS and infos[0].adapter_id == "a0"
    assert {(i.rank, i.target_modules) for i in infos} == {(4, ("q_proj", "v_proj"))}
