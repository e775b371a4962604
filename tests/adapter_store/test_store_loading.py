"""The loader thread: loads happen off the caller's thread, once per cold adapter, and a
broken adapter fails alone with a typed error while the store keeps serving the others."""

from __future__ import annotations

import json
import pickle
import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from loramux.adapter_store.errors import (
    AdapterError,
    InvalidAdapterId,
    PinLimitExceeded,
    UploadsDisabled,
    UploadTooLarge,
)
from loramux.adapter_store.format import CONFIG_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME, load_adapter
from loramux.adapter_store.store import AdapterStatus
from tests.adapter_store.store_fixtures import CountingLoader, make_store, write_adapter

TIMEOUT = 10.0


def wait_for(predicate, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture
def adapter_dir(tmp_path):
    root = tmp_path / "adapters"
    for i, name in enumerate(["a", "b", "c"]):
        write_adapter(root, name, seed=i)
    return root


def test_concurrent_requests_for_a_cold_adapter_load_it_once(adapter_dir):
    loader = CountingLoader(hold=True)
    with make_store(adapter_dir, max_slots=2, load_fn=loader) as store:
        barrier = threading.Barrier(8)

        def request():
            barrier.wait()
            store.prefetch("a")
            wait_for(lambda: store.is_resident("a"))
            slot = store.pin("a")
            assert slot is not None
            store.unpin(slot)

        threads = [threading.Thread(target=request) for _ in range(8)]
        for t in threads:
            t.start()
        assert loader.started.wait(TIMEOUT)
        time.sleep(0.02)  # let every thread ask while the load is held
        loader.release.set()
        for t in threads:
            t.join(TIMEOUT)
        assert loader.calls == {"a": 1}
        stats = store.stats()
        assert (stats.loads, stats.device_misses, stats.device_hits) == (1, 1, 8)


def test_a_slow_load_does_not_stall_the_engine_thread(adapter_dir):
    loader = CountingLoader()
    with make_store(adapter_dir, max_slots=2, load_fn=loader) as store:
        store.prefetch("b")
        wait_for(lambda: store.is_resident("b"))
        loader.release.clear()  # the next load blocks until released
        loader.started.clear()
        store.prefetch("a")
        assert loader.started.wait(TIMEOUT)
        assert store.info("a").status is AdapterStatus.LOADING
        start = time.perf_counter()
        for _ in range(1000):  # an engine thread's steps: pins and unpins of resident b
            assert not store.is_resident("a") and store.pin("a") is None
            slot = store.pin("b")
            store.unpin(slot)
            assert store.load_error("a") is None
        assert time.perf_counter() - start < 2.0
        loader.release.set()
        wait_for(lambda: store.is_resident("a"))


def _truncated(directory):
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])


def _wrong_shapes(directory):
    config = json.loads((directory / CONFIG_NAME).read_text())
    config["r"] = 2  # the tensors have rank 4
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def _pickled(directory):
    (directory / WEIGHTS_NAME).unlink()
    (directory / PICKLED_WEIGHTS_NAME).write_bytes(pickle.dumps({"evil": 1}))


def _bad_json(directory):
    (directory / CONFIG_NAME).write_text("{not json")


def _rank_too_large(directory):
    write_adapter(directory.parent, directory.name, r=16)


def _nan(directory):
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{name}.lora_A.weight": torch.full((4, 64), float("nan"))}
    tensors[f"{name}.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, directory / WEIGHTS_NAME)
    config = json.loads((directory / CONFIG_NAME).read_text())
    config.update(target_modules=["q_proj"], layers_to_transform=[0])
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def _not_safetensors(directory):
    (directory / WEIGHTS_NAME).write_bytes(b"\x00" * 64)


# corruption -> (error type, words in the message, found at registration already?)
CORRUPTIONS = {
    "truncated": (_truncated, "AdapterInvalid", "safetensors", False),
    "wrong_shapes": (_wrong_shapes, "AdapterInvalid", "shape", False),
    "pickled": (_pickled, "AdapterUnsupported", "pickled", True),
    "bad_json": (_bad_json, "AdapterInvalid", "JSON", True),
    "rank_too_large": (_rank_too_large, "AdapterTooLarge", "rank 16", True),
    "nan": (_nan, "AdapterInvalid", "NaN", False),
    "not_safetensors": (_not_safetensors, "AdapterInvalid", "safetensors", False),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupt_adapter_fails_alone(adapter_dir, corruption):
    corrupt, error_type, words, at_registration = CORRUPTIONS[corruption]
    corrupt(write_adapter(adapter_dir, "bad", seed=9))
    events = []
    with make_store(adapter_dir, max_slots=2, on_load=events.append) as store:
        info = store.info("bad")
        assert (info.status is AdapterStatus.FAILED) == at_registration
        store.prefetch("bad")
        store.prefetch("a")
        wait_for(lambda: store.is_resident("a"))
        wait_for(lambda: store.load_error("bad") is not None)
        error = store.load_error("bad")
        assert error.startswith("adapter 'bad'") and words in error, error
        info = store.info("bad")
        assert (info.status, info.error, info.error_type) == (
            AdapterStatus.FAILED, error, error_type
        )
        assert not store.is_resident("bad") and store.pin("bad") is None
        store.prefetch("bad")  # sticky: no new attempt
        # The store is healthy: the others load and pin.
        store.prefetch("b")
        wait_for(lambda: store.is_resident("b"))
        slot = store.pin("b")
        assert slot is not None
        store.unpin(slot)
        assert store.load_error("bad") == error
        failures = [e for e in events if not e.ok]
        assert len(failures) == (0 if at_registration else 1)
        assert store.stats().load_failures == len(failures)


def test_a_crashing_load_hook_fails_that_adapter_only(adapter_dir):
    def load_fn(adapter_id, directory, spec, max_rank, dtype):
        if adapter_id == "a":
            raise RuntimeError("disk on fire")
        return load_adapter(adapter_id, directory, spec, max_rank, dtype)

    with make_store(adapter_dir, max_slots=2, load_fn=load_fn) as store:
        store.prefetch("a")
        store.prefetch("b")
        wait_for(lambda: store.is_resident("b"))
        assert "disk on fire" in store.load_error("a")
        assert store.info("a").error_type == "RuntimeError"


def test_unknown_adapter_has_a_load_error(adapter_dir):
    with make_store(adapter_dir, max_slots=2) as store:
        assert store.load_error("zzz") == "unknown adapter 'zzz'"
        store.prefetch("zzz")
        assert not store.is_resident("zzz") and store.pin("zzz") is None
        assert store.load_error("a") is None


def test_load_waits_for_an_unpin_then_goes_at_once(adapter_dir):
    with make_store(adapter_dir, max_slots=1) as store:
        store.prefetch("a")
        wait_for(lambda: store.is_resident("a"))
        slot = store.pin("a")
        store.prefetch("b")
        time.sleep(0.05)
        assert not store.is_resident("b")
        store.unpin(slot)
        wait_for(lambda: store.is_resident("b"), timeout=1.0)


def test_fresh_grace_period_ends_on_its_own(adapter_dir):
    with make_store(adapter_dir, max_slots=1, fresh_grace_s=0.05) as store:
        store.prefetch("a")
        wait_for(lambda: store.is_resident("a"))
        store.prefetch("b")  # a was never pinned: b waits for a's grace period
        wait_for(lambda: store.is_resident("b"), timeout=2.0)
        assert not store.is_resident("a")


def test_load_events_and_a_failing_hook(adapter_dir):
    events = []

    def on_load(event):
        events.append(event)
        raise ValueError("a broken metrics hook")

    with make_store(adapter_dir, max_slots=2, on_load=on_load) as store:
        store.prefetch("a")
        wait_for(lambda: store.is_resident("a"))
        store.prefetch("b")
        wait_for(lambda: store.is_resident("b"))
    assert [(e.adapter_id, e.version, e.source, e.ok) for e in events] == [
        ("a", 1, "disk", True),
        ("b", 1, "disk", True),
    ]
    assert all(0 <= e.load_s <= e.queued_s + 1e-3 for e in events)
    assert len(store.stats().load_latency_s) == 2


def test_lifecycle(adapter_dir):
    store = make_store(adapter_dir, max_slots=2)
    with store:
        with pytest.raises(RuntimeError, match="already started"):
            store.start()
        with pytest.raises(RuntimeError, match="drain"):
            store.drain()
        thread = store._loader._thread
        assert thread.is_alive()
    assert not thread.is_alive()
    store.close()  # idempotent


def test_new_errors_pickle_and_read_well():
    errors = [
        InvalidAdapterId("../x", "must not contain '..'"),
        UploadTooLarge("a", None, 10, 5),
        UploadsDisabled("a", None, "uploads are disabled"),
        PinLimitExceeded("a", None, "too many"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error) and isinstance(copy, AdapterError)
    assert str(errors[1]) == "adapter 'a': upload is 10 bytes, more than the limit 5"
