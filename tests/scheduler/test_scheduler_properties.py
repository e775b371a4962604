"""Property tests: random arrivals, adapters, residency changes, aborts and tight KV pools.

Every step checks the scheduling invariants (harness.check_step: token budget, running cap,
max_loras, KV blocks and pins accounted exactly). At the end every request has finished for
a reason it may finish for, its streamed deltas equal its output, and nothing leaked.

Liveness: the oldest running request is never preempted (a lone request always fits) and
computes >= 1 token per step, so it finishes within max_model_len steps; while nothing runs,
the front waiting request's adapter is re-prefetched and loads once the few wanted ahead of
it in the store have. MAX_STEPS below is that argument with generous constants.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loramux.scheduler.request import FinishReason, Request, RequestStatus
from tests.scheduler.harness import (
    EOS,
    FakeClock,
    LoadingResidency,
    Trace,
    check_drained,
    make_request,
    make_scheduler,
    step,
)

ADAPTERS = [None, "a", "b", "c", "d", "bad"]  # "bad" fails to load from some step on
EVENT_HORIZON = 25  # arrivals, evictions, errors and aborts happen in steps [0, 25)


@dataclass(frozen=True)
class Arrival:
    step: int
    prompt_len: int
    max_tokens: int
    adapter_id: str | None
    params: dict


@dataclass(frozen=True)
class Scenario:
    config: dict
    num_slots: int
    load_steps: int
    arrivals: list[Arrival]
    evictions: list[tuple[int, str]]  # (step, adapter) evicted there if unpinned
    bad_from: int  # "bad" reports a load error from this step on
    aborts: list[tuple[int, int]]  # (step, arrival index)
    eos_rate: float
    seed: int


@st.composite
def scenarios(draw) -> Scenario:
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_model_len = draw(st.integers(4, 48))
    min_blocks = -(-max_model_len // block_size)
    max_loras = draw(st.integers(1, 3))
    config = dict(
        max_num_batched_tokens=draw(st.integers(1, 40)),
        max_num_seqs=draw(st.integers(1, 6)),
        num_kv_blocks=draw(st.integers(min_blocks, 2 * min_blocks)),  # tight: preemption
        block_size=block_size,
        max_model_len=max_model_len,
        max_loras=max_loras,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 1, 3, 8])),
        starvation_bound_s=draw(st.sampled_from([2.0, 6.0, math.inf])),
    )
    arrivals = draw(
        st.lists(
            st.builds(
                Arrival,
                step=st.integers(0, EVENT_HORIZON - 1),
                prompt_len=st.integers(1, max_model_len - 1),
                max_tokens=st.integers(1, 30),
                adapter_id=st.sampled_from(ADAPTERS),
                params=st.fixed_dictionaries(
                    {},
                    optional={
                        "ignore_eos": st.booleans(),
                        "stop_token_ids": st.just((5,)),
                        "repetition_window": st.sampled_from([4, 6]),
                    },
                ),
            ),
            min_size=1,
            max_size=16,
        )
    )
    steps = st.integers(0, EVENT_HORIZON - 1)
    return Scenario(
        config=config,
        num_slots=draw(st.integers(max_loras, max_loras + 1)),
        load_steps=draw(st.integers(0, 3)),
        arrivals=sorted(arrivals, key=lambda a: a.step),
        evictions=draw(st.lists(st.tuples(steps, st.sampled_from(ADAPTERS[1:])), max_size=6)),
        bad_from=draw(steps),
        aborts=draw(st.lists(st.tuples(steps, st.integers(0, len(arrivals) - 1)), max_size=3)),
        eos_rate=draw(st.sampled_from([0.0, 0.1])),
        seed=draw(st.integers(0, 2**16)),
    )


def max_steps(s: Scenario) -> int:
    """Generous liveness bound (module docstring)."""
    n = len(s.arrivals)
    grace = 2  # LoadingResidency default
    idle_phase = len(ADAPTERS) * (s.load_steps + grace + 3)
    return EVENT_HORIZON + n * s.config["max_model_len"] + (n + 1) * idle_phase + 10


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_workloads_keep_invariants_and_finish(s: Scenario):
    clock = FakeClock()
    residency = LoadingResidency(s.num_slots, load_steps=s.load_steps)
    sched = make_scheduler(residency, clock=clock, **s.config)
    rng = random.Random(s.seed)

    def sample(request: Request) -> int:
        if rng.random() < s.eos_rate:
            return EOS
        return rng.choice([3, 4, 5, 6, 7, 8])  # a small vocabulary: loops and stop ids happen

    requests: list[Request] = []
    aborted: set[str] = set()
    trace = Trace()
    limit = max_steps(s)
    for t in range(limit):
        clock.now = float(t)
        for arrival in (a for a in s.arrivals if a.step == t):
            request = make_request(f"q{len(requests)}", arrival.prompt_len, arrival.max_tokens,
                                   arrival.adapter_id, **arrival.params)
            requests.append(request)
            sched.add_request(request)
        for _, adapter_id in (e for e in s.evictions if e[0] == t):
            residency.evict_if_unpinned(adapter_id)
        if t == s.bad_from:
            residency.fail("bad", "adapter 'bad' was deleted")
        for _, index in (a for a in s.aborts if a[0] == t):
            if index < len(requests) and not requests[index].is_finished:
                aborted.add(requests[index].request_id)
                sched.finish_requests([requests[index].request_id], FinishReason.ABORT)
        residency.tick()
        if t >= EVENT_HORIZON and not sched.has_unfinished_requests():
            break
        trace.record(*step(sched, sample))  # step() checks the invariants
    else:
        raise AssertionError(f"not drained within {limit} steps")

    check_drained(sched)
    assert len(requests) == len(s.arrivals)
    for request in requests:
        event(f"finish: {request.finish_reason.value}")
    if any(o.preempted_request_ids for o in trace.outputs):
        event("preemption")
    for request in requests:
        check_finished(request, trace, aborted, sched.config.max_model_len)


def check_finished(request: Request, trace: Trace, aborted: set[str], max_model_len: int):
    rid, params = request.request_id, request.sampling_params
    assert request.status is RequestStatus.FINISHED
    assert request.block_ids == [] and request.adapter_slot is None
    # The streamed deltas are exactly the output: preemption lost or repeated nothing.
    assert trace.tokens.get(rid, []) == request.output_token_ids
    assert request.num_output_tokens <= params.max_tokens
    assert request.num_tokens <= max_model_len
    reason = request.finish_reason
    if rid in aborted:
        assert reason is FinishReason.ABORT and rid not in trace.finished
        return
    assert trace.finished[rid].finish_reason is reason
    if reason is FinishReason.LENGTH:
        assert (request.num_output_tokens == params.max_tokens
                or request.num_tokens == max_model_len)
    elif reason is FinishReason.STOP:
        last = request.output_token_ids[-1]
        assert (last == EOS and not params.ignore_eos) or last in params.stop_token_ids
    elif reason is FinishReason.REPETITION:
        assert params.repetition_window > 0
    elif reason is FinishReason.ERROR:
        assert request.adapter_id == "bad"  # waiting (maybe after a preemption) when it broke
        assert trace.finished[rid].error == "adapter 'bad' was deleted"
    else:
        raise AssertionError(f"unexpected finish reason {reason}")
