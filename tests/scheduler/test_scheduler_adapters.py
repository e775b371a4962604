"""Adapters: residency, prefetch, load errors, max_loras, pins, and the starvation bound."""

import math

import pytest

from loramux.scheduler.config import SchedulerConfigError
from loramux.scheduler.output import ModelRunnerOutput
from loramux.scheduler.request import BASE_SLOT, FinishReason, RequestStatus
from loramux.scheduler.residency import AdapterResidency
from tests.scheduler.harness import (
    FakeClock,
    FakeResidency,
    LoadingResidency,
    check_drained,
    drive,
    make_request,
    make_scheduler,
    step,
)


def ids(requests):
    return [r.request_id for r in requests]


def test_cold_adapter_is_prefetched_at_enqueue_and_waits_without_blocking_others():
    residency = FakeResidency(num_slots=2, resident=["warm"])
    sched = make_scheduler(residency)
    for rid, adapter in [("cold1", "cold"), ("base", None), ("warm", "warm"), ("cold2", "cold")]:
        sched.add_request(make_request(rid, adapter_id=adapter))
    assert residency.prefetched == ["cold", "warm", "cold"]  # never for base

    out, _ = step(sched)
    assert ids(out.scheduled_requests) == ["base", "warm"]
    assert ids(sched.waiting_requests) == ["cold1", "cold2"]  # still in their order
    assert sched.waiting_adapter_ids == {"cold"}
    assert sched.running_adapter_ids == {"warm"}

    slot = residency.make_resident("cold")
    out, _ = step(sched)
    assert ids(out.scheduled_requests) == ["base", "warm", "cold1", "cold2"]
    assert sched.running_requests[2].adapter_slot == slot
    assert sched.running_requests[0].adapter_slot == BASE_SLOT
    drive(sched)
    check_drained(sched)


def test_load_error_fails_only_that_adapters_requests():
    residency = FakeResidency(num_slots=2, resident=["ok"])
    residency.fail("gone", "adapter 'gone' not found")
    sched = make_scheduler(residency)
    for rid, adapter in [("g1", "gone"), ("ok", "ok"), ("g2", "gone"), ("base", None)]:
        sched.add_request(make_request(rid, adapter_id=adapter, max_tokens=2))

    out, deltas = step(sched)
    assert ids(out.scheduled_requests) == ["ok", "base"]
    failed = [d for d in deltas if d.error]
    assert ids_of(failed) == ["g1", "g2"]
    assert all(d.finished and d.finish_reason is FinishReason.ERROR for d in failed)
    assert failed[0].error == "adapter 'gone' not found"
    assert out.finished_request_ids == {"g1", "g2"}  # the runner may drop them too
    trace = drive(sched)
    assert {d.finish_reason for d in trace.finished.values()} == {FinishReason.LENGTH}
    check_drained(sched)


def ids_of(deltas):
    return [d.request_id for d in deltas]


def test_load_error_is_reported_even_when_nothing_runs():
    residency = FakeResidency(num_slots=1)
    sched = make_scheduler(residency, max_loras=1)
    sched.add_request(make_request("x", adapter_id="missing"))
    residency.fail("missing")
    out = sched.schedule()
    assert out.is_empty
    assert sched.has_unfinished_requests()  # the failure is not reported yet
    (delta,) = sched.update(out, ModelRunnerOutput({}))
    assert delta.request_id == "x" and delta.finish_reason is FinishReason.ERROR
    check_drained(sched)


def test_max_loras_limits_distinct_adapters_and_base_does_not_count():
    residency = FakeResidency(num_slots=3, resident=["a", "b", "c"])
    sched = make_scheduler(residency, max_loras=2)
    for rid, adapter in [("a1", "a"), ("b1", "b"), ("c1", "c"), ("a2", "a"), ("base", None)]:
        sched.add_request(make_request(rid, adapter_id=adapter, max_tokens=3))
    out, _ = step(sched)
    assert ids(out.scheduled_requests) == ["a1", "b1", "a2", "base"]
    assert +residency.refcount == {0: 2, 1: 1}  # c was never left pinned
    while "c1" not in ids(out.scheduled_requests):
        out, _ = step(sched)
    assert "a1" not in ids(sched.running_requests)  # admitted once a drained
    drive(sched)
    check_drained(sched)


def test_a_slot_is_leased_while_running_kept_on_preemption_and_released_on_finish():
    residency = FakeResidency(num_slots=2, resident=["a"])
    sched = make_scheduler(residency, num_kv_blocks=8, block_size=4, max_model_len=32)
    first = make_request("first", prompt_len=12, max_tokens=12, adapter_id="a")
    second = make_request("second", prompt_len=12, max_tokens=12, adapter_id="a")
    sched.add_request(first)
    sched.add_request(second)
    step(sched)
    assert residency.refcount[residency.slot_of["a"]] == 2
    while not step(sched)[0].preempted_request_ids:
        pass
    # preempted: its KV is gone but it keeps its lease, to resume on the same adapter version
    assert second.block_ids == [] and second.adapter_slot == residency.slot_of["a"]
    assert residency.refcount[residency.slot_of["a"]] == 2
    drive(sched)
    assert second.num_preemptions >= 1 and second.num_output_tokens == 12
    check_drained(sched)


def test_adapter_evicted_between_is_resident_and_pin_just_waits():
    class Racy(FakeResidency):
        def pin(self, adapter_id):
            return None

    residency = Racy(num_slots=1, resident=["a"])
    sched = make_scheduler(residency, max_loras=1)
    sched.add_request(make_request("x", adapter_id="a"))
    assert step(sched)[0].is_empty
    assert sched.num_waiting == 1


def test_the_fakes_satisfy_the_residency_protocol():
    assert isinstance(FakeResidency(), AdapterResidency)
    assert isinstance(LoadingResidency(2), AdapterResidency)


def test_max_loras_above_the_device_slots_is_refused():
    with pytest.raises(SchedulerConfigError, match="slots"):
        make_scheduler(FakeResidency(num_slots=2), max_loras=3)


# ------------------------------------------------------------------ starvation bound

BOUND_S = 5.0
MAX_TOKENS = 3
LOAD_STEPS = 2
COLD_AT = 1  # both warm slots are pinned by then


def _run_warm_stream(starvation_bound_s, steps=60):
    """Requests for warm adapters a and b arrive every step and keep both slots pinned;
    one request for cold adapter c arrives at t=COLD_AT. One step = one second.

    Returns (time c was admitted or None, times at which a warm request was admitted).
    """
    clock = FakeClock()
    residency = LoadingResidency(num_slots=2, load_steps=LOAD_STEPS)
    residency.make_resident("a")
    residency.make_resident("b")
    sched = make_scheduler(
        residency, clock=clock, max_loras=2, max_num_seqs=64, num_kv_blocks=512,
        starvation_bound_s=starvation_bound_s,
    )
    cold = make_request("cold", prompt_len=4, max_tokens=MAX_TOKENS, adapter_id="c")
    admitted_at, warm_admissions, seen = None, [], set()
    for t in range(steps):
        clock.now = float(t)
        for adapter in ("a", "b"):
            sched.add_request(make_request(f"{adapter}{t}", prompt_len=4,
                                           max_tokens=MAX_TOKENS, adapter_id=adapter))
        if t == COLD_AT:
            sched.add_request(cold)
        residency.tick()
        out, _ = step(sched)
        for request in out.scheduled_requests:
            if request is not cold and request.request_id not in seen:
                seen.add(request.request_id)
                warm_admissions.append(t)
        if admitted_at is None and cold.status is RequestStatus.RUNNING:
            admitted_at = t
    return admitted_at, warm_admissions, residency


def test_without_the_barrier_a_cold_adapter_starves_behind_busy_warm_ones():
    admitted_at, _, _ = _run_warm_stream(math.inf)
    assert admitted_at is None


def test_starvation_bound_holds():
    admitted_at, warm_admissions, residency = _run_warm_stream(BOUND_S)
    # Documented bound: starvation_bound_s + T_drain + T_load + one step. Here T_drain is
    # a running request's prefill step + MAX_TOKENS - 1 decodes, T_load is LOAD_STEPS.
    t_drain = MAX_TOKENS
    assert admitted_at is not None
    waited = admitted_at - COLD_AT
    assert BOUND_S < waited <= BOUND_S + t_drain + LOAD_STEPS + 1
    # Nothing queued behind the barrier was admitted while it stood...
    barrier_at = COLD_AT + BOUND_S + 1
    assert not [t for t in warm_admissions if barrier_at <= t < admitted_at]
    # ...and the barrier lifts once the cold request is in.
    assert [t for t in warm_admissions if t > admitted_at]
    # the skipped request's prefetch was repeated for the store
    assert residency.prefetched.count("c") > 1


def test_barrier_also_covers_requests_skipped_for_max_loras():
    clock = FakeClock()
    residency = FakeResidency(num_slots=3, resident=["a", "b", "c"])
    sched = make_scheduler(residency, clock=clock, max_loras=2, max_num_seqs=64,
                           num_kv_blocks=512, starvation_bound_s=BOUND_S)
    late = make_request("late", prompt_len=4, max_tokens=MAX_TOKENS, adapter_id="c")
    admitted_at = None
    for t in range(40):
        clock.now = float(t)
        for adapter in ("a", "b"):
            sched.add_request(make_request(f"{adapter}{t}", prompt_len=4,
                                           max_tokens=MAX_TOKENS, adapter_id=adapter))
        if t == 1:
            sched.add_request(late)
        step(sched)
        if admitted_at is None and late.status is RequestStatus.RUNNING:
            admitted_at = t
    assert admitted_at is not None
    assert 1 + BOUND_S < admitted_at <= 1 + BOUND_S + MAX_TOKENS + 1
