"""Continuous batching: token budget, running cap, chunked prefill, preemption, no leaks."""

import pytest

from loramux.scheduler.output import ModelRunnerOutput
from loramux.scheduler.request import FinishReason, RequestStatus
from loramux.scheduler.scheduler import DuplicateRequestId, PromptTooLong
from tests.scheduler.harness import (
    check_drained,
    drive,
    make_request,
    make_scheduler,
    step,
)


def test_one_request_prefills_then_decodes_to_max_tokens():
    sched = make_scheduler()
    request = make_request("a", prompt_len=8, max_tokens=3)
    sched.add_request(request)
    assert request.status is RequestStatus.WAITING and sched.num_waiting == 1

    out, deltas = step(sched)
    assert out.num_scheduled_tokens == [8]  # the whole prompt, one token sampled
    assert [d.new_token_ids for d in deltas] == [[1000]]
    assert request.status is RequestStatus.RUNNING and sched.num_running == 1

    out, deltas = step(sched)
    assert out.num_scheduled_tokens == [1]  # a decode
    out, deltas = step(sched)
    assert deltas[0].finished and deltas[0].finish_reason is FinishReason.LENGTH
    assert request.output_token_ids == [1000, 1001, 1002]
    check_drained(sched)

    # The runner learns about the end in the next step.
    out = sched.schedule()
    assert out.is_empty and out.finished_request_ids == {"a"}
    assert sched.schedule().finished_request_ids == frozenset()


def test_budget_and_running_cap_hold_and_everything_finishes():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=3, num_kv_blocks=200)
    requests = [make_request(f"r{i}", prompt_len=3 + 5 * i % 23, max_tokens=1 + i % 7)
                for i in range(12)]
    for request in requests:
        sched.add_request(request)
    trace = drive(sched)  # drive() checks the invariants every step
    assert max(len(o.scheduled_requests) for o in trace.outputs) == 3
    assert max(o.total_num_scheduled_tokens for o in trace.outputs) == 16
    for request in requests:
        assert trace.tokens[request.request_id] == request.output_token_ids
        assert request.num_output_tokens == request.sampling_params.max_tokens
        assert request.finish_reason is FinishReason.LENGTH
    check_drained(sched)


def test_long_prompt_is_chunked_while_other_requests_keep_decoding():
    sched = make_scheduler(max_num_batched_tokens=16, enable_prefix_caching=False)
    short = make_request("short", prompt_len=4, max_tokens=10)
    sched.add_request(short)
    step(sched)  # short prefilled, now decoding
    long = make_request("long", prompt_len=40, max_tokens=2)
    sched.add_request(long)

    chunks = []
    while long.num_output_tokens == 0:
        out, _ = step(sched)
        tokens = dict(zip((r.request_id for r in out.scheduled_requests),
                          out.num_scheduled_tokens))
        assert tokens["short"] == 1  # the decode runs in every step of the long prefill
        chunks.append(tokens["long"])
    assert chunks == [15, 15, 10]
    assert short.num_output_tokens == 4


def test_long_prefill_threshold_caps_one_prompt_per_step():
    sched = make_scheduler(max_num_batched_tokens=64, long_prefill_token_threshold=8)
    request = make_request("a", prompt_len=20, max_tokens=1)
    sched.add_request(request)
    sizes = [o.num_scheduled_tokens[0] for o in drive(sched).outputs]
    assert sizes == [8, 8, 4]


def test_preemption_takes_the_newest_and_it_keeps_its_output():
    # 8 blocks of 4 tokens; two requests of 12 prompt tokens grow until KV runs out.
    sched = make_scheduler(num_kv_blocks=8, block_size=4, max_model_len=32, enable_prefix_caching=False)
    old = make_request("old", prompt_len=12, max_tokens=12)
    new = make_request("new", prompt_len=12, max_tokens=12)
    sched.add_request(old)
    sched.add_request(new)

    step(sched)  # both prefilled: 3 blocks each, 2 free
    while True:
        out, _ = step(sched)
        if out.preempted_request_ids:
            break
    assert out.preempted_request_ids == {"new"}
    assert [r.request_id for r in out.scheduled_requests] == ["old"]
    assert new.status is RequestStatus.PREEMPTED and new.num_preemptions == 1
    assert new.num_computed_tokens == 0 and new.block_ids == [] and new.num_output_tokens > 0
    kept = list(new.output_token_ids)

    trace = drive(sched)
    assert old.num_output_tokens == new.num_output_tokens == 12
    assert new.output_token_ids[: len(kept)] == kept  # nothing generated was lost
    # On re-admission it recomputed prompt + the output it had (one chunk, budget allows).
    readmit = next(o for o in trace.outputs if new in o.scheduled_requests)
    assert readmit.num_scheduled_tokens[readmit.scheduled_requests.index(new)] == 12 + len(kept)
    check_drained(sched)


def test_no_admission_in_a_step_that_preempted():
    sched = make_scheduler(num_kv_blocks=8, block_size=4, max_model_len=32)
    for rid in ("a", "b"):
        sched.add_request(make_request(rid, prompt_len=12, max_tokens=12))
    step(sched)
    waiting = make_request("tiny", prompt_len=1, max_tokens=1)
    sched.add_request(waiting)
    while True:
        out, _ = step(sched)
        if out.preempted_request_ids:
            break
    assert waiting not in out.scheduled_requests
    drive(sched)
    check_drained(sched)


def test_waiting_requests_are_admitted_first_come_first_served_for_kv():
    sched = make_scheduler(num_kv_blocks=10, block_size=4, max_model_len=40, enable_prefix_caching=False)
    sched.add_request(make_request("running", prompt_len=24, max_tokens=8))
    step(sched)  # 7 blocks held, 3 free
    sched.add_request(make_request("big", prompt_len=20, max_tokens=1))  # needs 5
    sched.add_request(make_request("small", prompt_len=2, max_tokens=1))  # needs 1
    out, _ = step(sched)
    assert [r.request_id for r in out.scheduled_requests] == ["running"]
    drive(sched)
    check_drained(sched)


def test_a_preempted_request_is_readmitted_before_older_waiting_ones():
    sched = make_scheduler(num_kv_blocks=8, block_size=4, max_model_len=32,
                           max_num_seqs=2)
    sched.add_request(make_request("a", prompt_len=12, max_tokens=12))
    sched.add_request(make_request("b", prompt_len=12, max_tokens=12))
    sched.add_request(make_request("c", prompt_len=4, max_tokens=1))
    step(sched)
    while not step(sched)[0].preempted_request_ids:
        pass
    assert [r.request_id for r in sched.waiting_requests] == ["b", "c"]


def test_invalid_requests_are_refused_with_typed_errors():
    sched = make_scheduler(max_model_len=16)
    with pytest.raises(PromptTooLong):
        sched.add_request(make_request(prompt_len=16))
    sched.add_request(make_request("dup", prompt_len=15, max_tokens=1))
    with pytest.raises(DuplicateRequestId):
        sched.add_request(make_request("dup"))
    used = make_request("used")
    used.num_computed_tokens = 3
    with pytest.raises(ValueError, match="fresh"):
        sched.add_request(used)


def test_request_id_can_be_reused_after_it_finished():
    sched = make_scheduler()
    sched.add_request(make_request("x", max_tokens=1))
    drive(sched)
    sched.add_request(make_request("x", max_tokens=1))
    drive(sched)
    check_drained(sched)


def test_empty_step_and_metrics():
    sched = make_scheduler()
    out = sched.schedule()
    assert out.is_empty and out.total_num_scheduled_tokens == 0
    assert sched.update(out, ModelRunnerOutput({})) == []
    assert not sched.has_unfinished_requests()
    assert sched.kv_cache_usage == 0.0
    sched.add_request(make_request("a", prompt_len=16, max_tokens=4))
    step(sched)
    assert sched.num_running == 1 and sched.num_waiting == 0
    # 16 prompt tokens computed in blocks of 4; the sampled token gets a block next step.
    assert sched.kv_cache_usage == pytest.approx(4 / 64)
    step(sched)
    assert sched.kv_cache_usage == pytest.approx(5 / 64)
