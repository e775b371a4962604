"""A preempted request keeps its adapter slot lease while it waits, so it resumes on the
adapter version it started with, even after that adapter was replaced or deleted."""

from __future__ import annotations

from loramux.scheduler.request import FinishReason, RequestStatus
from tests.scheduler.harness import (
    FakeResidency,
    Trace,
    check_drained,
    make_request,
    make_scheduler,
    step,
)


def _preempt_second(residency):
    sched = make_scheduler(residency, num_kv_blocks=8, block_size=4, max_model_len=32)
    first = make_request("first", prompt_len=12, max_tokens=12, adapter_id="a")
    second = make_request("second", prompt_len=12, max_tokens=12, adapter_id="a")
    sched.add_request(first)
    sched.add_request(second)
    trace = Trace()
    while True:
        output, deltas = step(sched)
        trace.record(output, deltas)
        if output.preempted_request_ids:
            break
    assert second.status is RequestStatus.PREEMPTED
    return sched, second, trace


def test_deleted_while_preempted_still_finishes_on_its_slot():
    residency = FakeResidency(num_slots=2, resident=["a"])
    sched, second, trace = _preempt_second(residency)
    old_slot = second.adapter_slot
    assert old_slot == residency.slot_of["a"]
    residency.errors["a"] = "adapter 'a' was deleted"  # new requests would fail now
    residency.slot_of.pop("a")  # and it is not resident any more
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        output, deltas = step(sched)
        trace.record(output, deltas)
        if second in output.scheduled_requests and not second.is_finished:
            assert second.adapter_slot == old_slot
    assert trace.finished["second"].finish_reason is FinishReason.LENGTH
    assert second.num_output_tokens == 12
    check_drained(sched)
    # A new request on the deleted adapter fails, as before.
    late = make_request("late", adapter_id="a")
    sched.add_request(late)
    _, deltas = step(sched)
    assert [d.finish_reason for d in deltas] == [FinishReason.ERROR]


def test_replaced_while_preempted_resumes_on_the_old_slot():
    residency = FakeResidency(num_slots=3, resident=["a"])
    sched, second, trace = _preempt_second(residency)
    old_slot = second.adapter_slot
    residency.slot_of["a"] = 2  # the new version, in another slot
    while sched.has_unfinished_requests():
        output, deltas = step(sched)
        trace.record(output, deltas)
        if second in output.scheduled_requests and not second.is_finished:
            assert second.adapter_slot == old_slot != 2
    assert trace.finished["second"].finish_reason is FinishReason.LENGTH
    check_drained(sched)


def test_an_aborted_preempted_request_returns_its_lease():
    residency = FakeResidency(num_slots=2, resident=["a"])
    sched, second, _ = _preempt_second(residency)
    assert residency.refcount[residency.slot_of["a"]] == 2
    sched.finish_requests("second", FinishReason.ABORT)
    assert residency.refcount[residency.slot_of["a"]] == 1 and second.adapter_slot is None
