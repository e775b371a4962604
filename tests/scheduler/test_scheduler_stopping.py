"""Stop conditions, runner failures, aborts from outside, and logprobs pass-through."""

import pytest

from loramux.scheduler.output import ModelRunnerOutput, TokenLogprobs
from loramux.scheduler.request import FinishReason, RequestStatus
from loramux.scheduler.stop import is_repetition_loop
from tests.scheduler.harness import (
    EOS,
    check_drained,
    check_resources,
    drive,
    make_request,
    make_scheduler,
    sampled_this_step,
    step,
)


def always(token):
    return lambda request: token


def run_one(sample, max_model_len=128, **params):
    sched = make_scheduler(max_model_len=max_model_len)
    request = make_request("r", prompt_len=params.pop("prompt_len", 8), **params)
    sched.add_request(request)
    trace = drive(sched, sample=sample)
    check_drained(sched)
    assert trace.tokens["r"] == request.output_token_ids
    assert trace.finished["r"].finish_reason is request.finish_reason
    return request


def test_eos_stops_and_stays_in_the_output():
    request = run_one(always(EOS), max_tokens=10)
    assert request.output_token_ids == [EOS]
    assert request.finish_reason is FinishReason.STOP and request.stop_reason is None


def test_ignore_eos_runs_to_max_tokens():
    request = run_one(always(EOS), max_tokens=5, ignore_eos=True)
    assert request.output_token_ids == [EOS] * 5
    assert request.finish_reason is FinishReason.LENGTH


def test_min_tokens_come_before_eos_and_stop_token_ids_can_end_it():
    request = run_one(always(EOS), max_tokens=10, min_tokens=3)
    assert request.num_output_tokens == 4 and request.finish_reason is FinishReason.STOP
    request = run_one(always(77), max_tokens=10, min_tokens=2, stop_token_ids=(77,))
    assert request.num_output_tokens == 3 and request.stop_reason == 77


def test_stop_token_id_sets_stop_reason():
    tokens = iter([5, 6, 42, 7])
    request = run_one(lambda r: next(tokens), max_tokens=10, stop_token_ids=(41, 42))
    assert request.output_token_ids == [5, 6, 42]
    assert request.finish_reason is FinishReason.STOP and request.stop_reason == 42


def test_max_tokens_gives_length():
    request = run_one(lambda r: 1000 + r.num_output_tokens, max_tokens=6)
    assert request.num_output_tokens == 6 and request.finish_reason is FinishReason.LENGTH


def test_eos_on_the_last_allowed_token_is_a_stop_not_length():
    request = run_one(lambda r: EOS if r.num_output_tokens == 2 else 9, max_tokens=3)
    assert request.num_output_tokens == 3 and request.finish_reason is FinishReason.STOP


def test_max_model_len_gives_length():
    request = run_one(lambda r: 1000 + r.num_output_tokens, max_model_len=14,
                      prompt_len=10, max_tokens=100)
    assert request.num_tokens == 14 and request.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize(
    "tokens, window, max_period, expected",
    [
        ([1] * 4, 4, 8, True),  # period 1
        ([9, 1, 2, 1, 2, 1, 2], 6, 8, True),  # period 2, three loops
        ([1, 2, 3, 1, 2, 3], 6, 3, True),  # period 3, twice
        ([1, 2, 3, 1, 2, 3], 6, 2, False),  # period above max_period
        ([1, 2, 3, 4, 1, 2, 3], 7, 8, False),  # a loop seen once and a half is not a loop
        ([1, 2, 1, 2, 1, 3], 6, 8, False),  # broken at the end
        ([1, 1, 1], 4, 8, False),  # shorter than the window
        ([5, 5], 1, 8, False),  # a window of 1 cannot hold a repeat
    ],
)
def test_repetition_loop_detection(tokens, window, max_period, expected):
    assert is_repetition_loop(tokens, window, max_period) is expected


def test_repetition_guard_ends_a_looping_request():
    loop = [5, 6, 7]
    request = run_one(lambda r: loop[r.num_output_tokens % 3], max_tokens=100,
                      repetition_window=9, repetition_max_period=4)
    assert request.num_output_tokens == 9
    assert request.finish_reason is FinishReason.REPETITION


def test_runner_failure_of_one_request_leaves_the_others_running():
    sched = make_scheduler()
    bad, good = make_request("bad", max_tokens=5), make_request("good", max_tokens=5)
    sched.add_request(bad)
    sched.add_request(good)
    out, deltas = step(sched, failed={"bad": "CUDA error: illegal memory access"})
    (failure,) = [d for d in deltas if d.request_id == "bad"]
    assert failure.finished and failure.finish_reason is FinishReason.ERROR
    assert failure.error == "CUDA error: illegal memory access" and failure.new_token_ids == []
    assert bad.block_ids == [] and bad.error == failure.error
    assert sched.running_requests == (good,)
    out, _ = step(sched)
    assert out.finished_request_ids == {"bad"}
    drive(sched)
    assert good.num_output_tokens == 5
    check_drained(sched)


def test_a_missing_sample_fails_that_request_instead_of_stalling():
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    out = sched.schedule()
    (delta,) = sched.update(out, ModelRunnerOutput({}))
    assert delta.finish_reason is FinishReason.ERROR and "no token" in delta.error
    check_drained(sched)


def test_finish_requests_ends_waiting_and_running_and_ignores_unknown_ids():
    sched = make_scheduler(max_num_seqs=1)
    running, waiting = make_request("run", max_tokens=9), make_request("wait")
    sched.add_request(running)
    sched.add_request(waiting)
    step(sched)
    assert running.block_ids and waiting.status is RequestStatus.WAITING

    sched.finish_requests(["run", "wait", "nope"], FinishReason.ABORT)
    sched.finish_requests("run", FinishReason.STOP)  # already finished: ignored
    for request in (running, waiting):
        assert request.status is RequestStatus.FINISHED
        assert request.finish_reason is FinishReason.ABORT and request.block_ids == []
    check_drained(sched)
    assert sched.schedule().finished_request_ids == {"run", "wait"}


def test_stop_string_found_by_the_engine_ends_a_running_request():
    sched = make_scheduler()
    request = make_request("a", max_tokens=9)
    sched.add_request(request)
    step(sched)
    sched.finish_requests({"a"}, FinishReason.STOP, stop_reason="\n\n")
    assert request.finish_reason is FinishReason.STOP and request.stop_reason == "\n\n"
    check_drained(sched)


def test_abort_between_schedule_and_update_is_safe():
    sched = make_scheduler()
    a, b = make_request("a", max_tokens=3), make_request("b", max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sched.finish_requests("a", FinishReason.ABORT)
    deltas = sched.update(out, ModelRunnerOutput({"a": 1, "b": 1}))
    assert [d.request_id for d in deltas] == ["b"]
    assert a.output_token_ids == [] and a.num_computed_tokens == 0
    check_resources(sched)
    drive(sched)
    check_drained(sched)


def test_sampled_logprobs_are_passed_through():
    sched = make_scheduler()
    sched.add_request(make_request("a", max_tokens=2, logprobs=1))
    _, deltas = step(sched, with_logprobs=True)
    assert deltas[0].new_logprobs == [TokenLogprobs(1000, -0.5, 1)]


def _prompt_lps(out):
    """One entry per prompt position computed this step (positions after the first)."""
    result = {}
    for request, n in zip(out.scheduled_requests, out.num_scheduled_tokens):
        start = request.num_computed_tokens
        positions = range(max(start, 1), min(start + n, request.num_prompt_tokens))
        if positions:
            result[request.request_id] = [TokenLogprobs(p, -float(p), 1) for p in positions]
    return result


def _step_with_prompt_logprobs(sched):
    out = sched.schedule()
    sampled = {r.request_id: 1000 + r.num_output_tokens for r in sampled_this_step(out)}
    return out, sched.update(out, ModelRunnerOutput(sampled, prompt_logprobs=_prompt_lps(out)))


def test_prompt_logprobs_come_once_per_position_over_chunks_and_preemption():
    # Budget 8 chunks the 12-token prompts; 8 blocks of 4 force a preemption later on.
    sched = make_scheduler(max_num_batched_tokens=8, num_kv_blocks=8, block_size=4,
                           max_model_len=32)
    requests = [make_request(rid, prompt_len=12, max_tokens=14, prompt_logprobs=0)
                for rid in ("a", "b")]
    for request in requests:
        sched.add_request(request)
    received = {"a": [], "b": []}
    preempted = False
    while sched.has_unfinished_requests():
        out, deltas = _step_with_prompt_logprobs(sched)
        preempted |= bool(out.preempted_request_ids)
        for delta in deltas:
            received[delta.request_id].extend(lp.token_id for lp in delta.prompt_logprobs)
    assert preempted and any(r.num_preemptions for r in requests)
    assert received == {"a": list(range(1, 12)), "b": list(range(1, 12))}
    check_drained(sched)
