"""The real scheduler over the store (loads drained between steps): cold adapters load
and their requests run, a broken adapter fails only its own requests, a replacement
mid-run keeps the running request on its slot, and every pin is returned."""

from __future__ import annotations

import json

import pytest

from loramux.adapter_store.format import CONFIG_NAME
from loramux.scheduler.request import FinishReason
from tests.adapter_store.store_fixtures import (
    FakeClock,
    make_store,
    slot_contents,
    write_adapter,
)
from tests.adapter_store.test_store_versions import same_contents
from tests.scheduler.harness import Trace, check_drained, make_request, make_scheduler, step


def test_scheduler_runs_requests_through_the_store(tmp_path):
    root = tmp_path / "adapters"
    for i, name in enumerate("abc"):
        write_adapter(root, name, seed=i)
    (write_adapter(root, "bad") / CONFIG_NAME).write_text(json.dumps({"r": 0}))
    clock = FakeClock()
    store = make_store(root, max_slots=2, clock=clock, fresh_grace_s=1.0)
    store.start(run_loader=False)
    scheduler = make_scheduler(store, max_loras=2)

    adapters = ["a", "b", "c", "bad", None, "a"]
    requests = [make_request(adapter_id=a, max_tokens=3) for a in adapters]
    for request in requests:
        scheduler.add_request(request)
    trace = Trace()
    replaced = None  # (request, slot, slot contents) when "a" was replaced
    for _ in range(60):
        if not scheduler.has_unfinished_requests():
            break
        trace.record(*step(scheduler))
        running = {r.adapter_id: r for r in scheduler._running}
        if replaced is None and "a" in running:
            # Replace "a" while its request runs: it keeps its slot and weights.
            request = running["a"]
            replaced = (request, request.adapter_slot, slot_contents(store, request.adapter_slot))
            store.register_directory("a", write_adapter(tmp_path / "v2", "a", seed=7))
        if replaced is not None and replaced[0] in scheduler._running:
            assert replaced[0].adapter_slot == replaced[1]
            assert same_contents(slot_contents(store, replaced[1]), replaced[2])
        store.drain()
        clock.now += 0.5
    assert replaced
    check_drained(scheduler)
    reasons = {r.request_id: trace.finished[r.request_id].finish_reason for r in requests}
    assert reasons[requests[3].request_id] is FinishReason.ERROR
    assert trace.finished[requests[3].request_id].error == store.load_error("bad")
    assert store.load_error("bad").startswith("adapter 'bad'")
    others = [r for i, r in enumerate(requests) if i != 3]
    assert all(reasons[r.request_id] is FinishReason.LENGTH for r in others)
    stats = store.stats()
    assert stats.num_leased_slots == 0 and stats.num_retired == 0
    assert store.info("a").version == 2


def _preempted_request(tmp_path, change):
    """Two requests on "a" fill the KV cache until the newer is preempted; then `change`
    replaces or deletes "a" while it waits. Returns (scheduler, store, request, old slot,
    that slot's contents, trace)."""
    root = tmp_path / "adapters"
    write_adapter(root, "a", seed=1)
    clock = FakeClock()
    store = make_store(root, max_slots=2, clock=clock, fresh_grace_s=1.0)
    store.start(run_loader=False)
    store.prefetch("a")
    store.drain()
    scheduler = make_scheduler(store, max_loras=2, num_kv_blocks=8, block_size=4, max_model_len=32)
    first = make_request("first", prompt_len=12, max_tokens=12, adapter_id="a")
    second = make_request("second", prompt_len=12, max_tokens=12, adapter_id="a")
    scheduler.add_request(first)
    scheduler.add_request(second)
    trace = Trace()
    for _ in range(40):
        output, deltas = step(scheduler)
        trace.record(output, deltas)
        if output.preempted_request_ids:
            break
    assert "second" in output.preempted_request_ids
    slot = second.adapter_slot
    contents = slot_contents(store, slot)
    change(store, tmp_path)
    store.drain()
    return scheduler, store, second, slot, contents, trace


def _replace(store, tmp_path):
    store.register_directory("a", write_adapter(tmp_path / "v2", "a", seed=9))
    store.prefetch("a")  # the new version gets a slot of its own


def _delete(store, tmp_path):
    store.delete("a")


@pytest.mark.parametrize("change", [_replace, _delete], ids=["replaced", "deleted"])
def test_a_preempted_request_resumes_on_the_version_it_started_with(tmp_path, change):
    scheduler, store, request, slot, contents, trace = _preempted_request(tmp_path, change)
    assert store.stats().num_retired == 1  # the old version's slot, still leased
    resumed = False
    for _ in range(80):
        if not scheduler.has_unfinished_requests():
            break
        trace.record(*step(scheduler))
        if request in scheduler._running:
            resumed = True
            assert request.adapter_slot == slot
            assert same_contents(slot_contents(store, slot), contents)
        store.drain()
    assert resumed
    check_drained(scheduler)
    assert trace.finished["second"].finish_reason is FinishReason.LENGTH
    assert trace.finished["first"].finish_reason is FinishReason.LENGTH
    stats = store.stats()
    assert stats.num_leased_slots == 0 and stats.num_retired == 0  # the old slot is free again
    # New requests see the change.
    if change is _delete:
        assert store.load_error("a") is not None
    else:
        assert store.info("a").version == 2
