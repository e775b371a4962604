"""Property test of prefix caching over random request streams (no torch).

A fake runner keeps a fake KV cache: each (block, offset) cell holds what a real forward
would have written there, (adapter id, adapter version, the tokens up to that position).
Every step, before "computing", it checks that every cell a scheduled request reads (its
positions below num_computed_tokens) holds exactly what that request would have computed
itself, under its own adapter version; it never writes into a block registered in the cache.
With prompts drawn from a few shared system prompts, several adapters, adapter reloads (new
versions), aborts, chunked prefill, prompt-logprob requests and tight KV pools (preemption),
harness.check_step also checks every step that ref counts equal holders (no leak, no double
free). The same stream run with caching off gives the same outputs, token for token.
"""

from __future__ import annotations

import hashlib

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from loramux.scheduler.output import ModelRunnerOutput
from loramux.scheduler.request import FinishReason, Request, RequestStatus
from loramux.scheduler.sampling_params import SamplingParams
from tests.scheduler.harness import LoadingResidency, check_drained, check_step, make_scheduler

ADAPTERS = [None, "a", "b"]
SYSTEM_PROMPTS = [[11, 12, 13, 14, 15, 16, 17], [11, 12, 13, 14, 21, 22], [31, 32, 33]]
HORIZON = 20


def fake_token(adapter_id: str | None, tokens: list[int]) -> int:
    """The fake model: a deterministic function of the adapter and the context."""
    digest = hashlib.sha256(repr((adapter_id, tokens)).encode()).digest()
    return 3 + digest[0] % 6  # a small vocabulary: shared continuations happen


class FakeKVRunner:
    def __init__(self, scheduler, residency: LoadingResidency) -> None:
        self.scheduler = scheduler
        self.residency = residency
        self.cells: dict[tuple[int, int], tuple] = {}

    def _content(self, request: Request, position: int) -> tuple:
        version = None
        if request.adapter_id is not None:
            version = self.residency.slot_versions[request.adapter_slot]
        return (request.adapter_id, version, tuple(request.all_token_ids[: position + 1]))

    def execute(self, output) -> ModelRunnerOutput:
        kv = self.scheduler.kv_cache
        bs = kv.block_size
        sampled: dict[str, int] = {}
        for request, n in zip(output.scheduled_requests, output.num_scheduled_tokens):
            start = request.num_computed_tokens
            for p in range(start):  # what attention reads
                cell = (request.block_ids[p // bs], p % bs)
                assert self.cells.get(cell) == self._content(request, p), (
                    f"{request.request_id} reads position {p} computed by another adapter, "
                    "version or context"
                )
            for p in range(start, start + n):  # what the forward writes
                block = request.block_ids[p // bs]
                assert not kv.is_cached(block), "a cached (shared) block was written"
                self.cells[(block, p % bs)] = self._content(request, p)
            if start + n == request.num_tokens:
                sampled[request.request_id] = fake_token(request.adapter_id, request.all_token_ids)
        return ModelRunnerOutput(sampled)


@st.composite
def streams(draw):
    block_size = draw(st.sampled_from([1, 2, 3, 4]))
    max_model_len = 32
    min_blocks = -(-max_model_len // block_size)
    config = dict(
        max_num_batched_tokens=draw(st.integers(4, 40)),
        max_num_seqs=draw(st.integers(1, 6)),
        num_kv_blocks=draw(st.integers(min_blocks, 3 * min_blocks)),
        block_size=block_size,
        max_model_len=max_model_len,
        max_loras=2,
        long_prefill_token_threshold=draw(st.sampled_from([0, 0, 3, 5])),
    )
    arrivals = draw(st.lists(
        st.tuples(
            st.integers(0, HORIZON - 1),  # step
            st.sampled_from(ADAPTERS),
            st.integers(0, len(SYSTEM_PROMPTS) - 1),
            st.lists(st.integers(40, 43), max_size=6),  # the user's tail
            st.integers(1, 8),  # max_tokens
            st.sampled_from([None, None, None, 0]),  # prompt_logprobs
        ),
        min_size=1, max_size=14,
    ))
    reloads = draw(st.lists(st.tuples(st.integers(0, HORIZON - 1), st.sampled_from(["a", "b"])), max_size=4))
    aborts = draw(st.lists(st.tuples(st.integers(0, HORIZON - 1), st.integers(0, 13)), max_size=3))
    return config, sorted(arrivals, key=lambda a: a[0]), reloads, aborts


def run(config, arrivals, reloads, aborts, enable: bool):
    residency = LoadingResidency(num_slots=3, load_steps=1)
    sched = make_scheduler(residency, enable_prefix_caching=enable, **config)
    runner = FakeKVRunner(sched, residency)
    requests: list[Request] = []
    aborted: set[str] = set()
    for t in range(2000):
        for when, adapter_id, system, tail, max_tokens, prompt_logprobs in arrivals:
            if when == t:
                prompt = (SYSTEM_PROMPTS[system] + tail)[: config["max_model_len"] - 1]
                params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs)
                request = Request(f"q{len(requests)}", prompt, params, adapter_id=adapter_id)
                requests.append(request)
                sched.add_request(request)
        for when, adapter_id in reloads:
            if when == t:  # a reload is a new version of the adapter
                residency.evict_if_unpinned(adapter_id)
        for when, index in aborts:
            if when == t and index < len(requests) and not requests[index].is_finished:
                aborted.add(requests[index].request_id)
                sched.finish_requests([requests[index].request_id], FinishReason.ABORT)
        residency.tick()
        if t >= HORIZON and not sched.has_unfinished_requests():
            break
        output = sched.schedule()
        check_step(sched, output)  # ref counts == holders, pools partition the rest
        sched.update(output, runner.execute(output))
    else:
        raise AssertionError("not drained")
    check_drained(sched)
    for request in requests:
        assert request.status is RequestStatus.FINISHED
    return sched, {r.request_id: (r.output_token_ids, r.finish_reason) for r in requests if r.request_id not in aborted}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_random_streams_read_only_their_own_kv_and_match_caching_off(stream):
    config, arrivals, reloads, aborts = stream
    on_sched, on = run(config, arrivals, reloads, aborts, enable=True)
    off_sched, off = run(config, arrivals, reloads, aborts, enable=False)
    hits = on_sched.prefix_cache_stats.total().hits
    event("cache hits" if hits else "no cache hit")
    assert off_sched.prefix_cache_stats.total().queries == 0
    for rid in on.keys() & off.keys():
        assert on[rid] == off[rid], rid
