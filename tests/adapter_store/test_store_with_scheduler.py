"""The real scheduler over the store (loads drained between steps): cold adapters load
and their requests run, a broken adapter fails only its own requests, a replacement
mid-run keeps the running request on its slot, and every pin is returned."""

from __future__ import annotations

import json

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
