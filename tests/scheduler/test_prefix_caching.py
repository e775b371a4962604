"""Prefix caching keyed by adapter: reuse, isolation between adapters and versions, eviction
before preemption, stats. No torch: hand-written runner outputs (harness.step)."""

from __future__ import annotations

import pytest

from loramux.scheduler.block_hash import root_hash
from loramux.scheduler.kv_cache_manager import KVCacheManager
from loramux.scheduler.output import ModelRunnerOutput
from loramux.scheduler.request import Request, RequestStatus
from loramux.scheduler.sampling_params import SamplingParams
from tests.scheduler.harness import (
    FakeResidency,
    check_drained,
    drive,
    make_scheduler,
    step,
)

BS = 4  # block size of these tests


def req(rid: str, tokens: list[int], adapter_id: str | None = None, max_tokens: int = 2, **params) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, ignore_eos=True, **params),
                   adapter_id=adapter_id)


PROMPT = list(range(100, 118))  # 18 tokens: 4 full blocks of 4 and 2 tokens


def scheduled(output, request) -> int:
    return output.num_scheduled_tokens[output.scheduled_requests.index(request)]


def run_alone(sched, request) -> None:
    sched.add_request(request)
    drive(sched)
    assert request.is_finished


def test_same_adapter_same_prefix_reuses_the_longest_cached_chain():
    sched = make_scheduler(block_size=BS, residency=FakeResidency(resident=["a"]))
    first = req("first", PROMPT, "a")
    run_alone(sched, first)
    # Same 16 leading tokens, then a different tail: 4 blocks hit, only the rest is computed.
    second = req("second", PROMPT[:16] + [7, 7, 7, 7, 7], "a")
    sched.add_request(second)
    out, _ = step(sched)
    assert second.num_computed_tokens == 16 + 5  # the hit, then the 5 tokens computed here
    assert scheduled(out, second) == 5
    stats = sched.prefix_cache_stats.snapshot()["a"]
    assert stats.requests == 2 and stats.hits == 16 and stats.hit_blocks == 4
    assert stats.queries == 18 + 21 and stats.query_blocks == 4 + 5
    drive(sched)
    check_drained(sched)  # cached blocks are free (evictable): nothing leaked


def test_blocks_are_shared_while_both_requests_run():
    sched = make_scheduler(block_size=BS, max_num_batched_tokens=64)
    first = req("first", PROMPT, max_tokens=8)
    sched.add_request(first)
    step(sched)  # first prefilled: its 4 full blocks are registered
    second = req("second", PROMPT, max_tokens=2)
    sched.add_request(second)
    out, _ = step(sched)
    assert second.block_ids[:4] == first.block_ids[:4]
    assert all(sched.kv_cache.ref_count(b) == 2 for b in first.block_ids[:4])
    assert scheduled(out, second) == 2  # 18 - 16 cached
    drive(sched)  # step() checks ref counts against holders every step
    check_drained(sched)


@pytest.mark.parametrize("other", ["b", None], ids=["other-adapter", "base"])
def test_two_adapters_with_the_same_prompt_never_share_blocks(other):
    sched = make_scheduler(block_size=BS, residency=FakeResidency(resident=["a", "b"]))
    a = req("a1", PROMPT, "a", max_tokens=8)
    sched.add_request(a)
    step(sched)
    assert sched.kv_cache.num_cached_blocks == 4
    b = req("b1", PROMPT, other, max_tokens=8)
    sched.add_request(b)
    out, _ = step(sched)
    assert scheduled(out, b) == len(PROMPT)  # computed from scratch
    assert set(a.block_ids).isdisjoint(b.block_ids)
    assert sched.kv_cache.num_cached_blocks == 8  # both chains cached, separately
    label = other if other is not None else "base"
    assert sched.prefix_cache_stats.snapshot()[label].hits == 0


def test_two_versions_of_one_adapter_never_share_blocks():
    residency = FakeResidency(resident=["a"])
    sched = make_scheduler(block_size=BS, residency=residency)
    run_alone(sched, req("v1", PROMPT, "a"))
    assert sched.kv_cache.num_cached_blocks == 4
    # The adapter is replaced: a new version in a slot (here the same one).
    residency.evict("a")
    residency.make_resident("a")
    v2 = req("v2", PROMPT, "a")
    sched.add_request(v2)
    out, _ = step(sched)
    assert scheduled(out, v2) == len(PROMPT)  # nothing of version 1 was reused
    assert sched.prefix_cache_stats.snapshot()["a"].hits == 0
    # And version 2's own blocks are reused by the next version-2 request.
    drive(sched)
    again = req("again", PROMPT, "a")
    sched.add_request(again)
    out, _ = step(sched)
    assert scheduled(out, again) == 2


def test_replaced_adapter_old_version_requests_keep_their_chain():
    """Requests still running on the old slot hash with the old version; new ones with the new."""
    residency = FakeResidency(num_slots=4, resident=["a"])
    sched = make_scheduler(block_size=BS, residency=residency, max_loras=2)
    old = req("old", PROMPT, "a", max_tokens=20)
    sched.add_request(old)
    step(sched)
    # Replace: the running request keeps its lease on the old slot; new pins get slot 1.
    residency.slot_of["a"] = 1
    residency.slot_versions[1] = 2
    new = req("new", PROMPT, "a", max_tokens=2)
    sched.add_request(new)
    out, _ = step(sched)
    assert new.adapter_slot == 1 and old.adapter_slot == 0
    assert scheduled(out, new) == len(PROMPT)
    assert set(old.block_ids).isdisjoint(new.block_ids)


def test_root_hash_separates_adapter_ids_versions_and_base():
    roots = {root_hash(None, None), root_hash("a", 1), root_hash("a", 2), root_hash("b", 1),
             root_hash("None", None), root_hash("a1", None)}
    assert len(roots) == 6


def test_a_fully_cached_prompt_still_computes_its_last_token():
    sched = make_scheduler(block_size=BS)
    prompt = PROMPT[:16]  # exactly 4 blocks
    run_alone(sched, req("first", prompt))
    second = req("second", prompt)
    sched.add_request(second)
    out, deltas = step(sched)
    # 3 blocks hit (12 tokens): the last block is recomputed so the runner has a row to sample.
    assert scheduled(out, second) == 4
    assert second.num_output_tokens == 1


def test_unused_cached_blocks_are_evicted_before_any_running_request_is_preempted():
    # 10 blocks. A finished request leaves 4 cached (evictable) blocks behind.
    sched = make_scheduler(block_size=BS, num_kv_blocks=10, max_model_len=40, max_num_batched_tokens=64)
    run_alone(sched, req("cached", PROMPT))
    assert sched.kv_cache.num_cached_blocks == 4 and sched.kv_cache.num_free_blocks == 10
    # Two unrelated requests that together need all 10 blocks: no preemption, cache evicted.
    x = req("x", [1] * 20, max_tokens=4)  # 6 blocks by the end
    y = req("y", [2] * 13, max_tokens=3)  # 4 blocks by the end
    sched.add_request(x)
    sched.add_request(y)
    trace = drive(sched)
    assert not any(o.preempted_request_ids for o in trace.outputs)
    assert x.num_preemptions == y.num_preemptions == 0
    # The room came from the cached chain: it is gone (at least its end).
    probe = sched.kv_cache.find_cached_prefix(req("probe", PROMPT), None, None)
    assert len(probe.block_ids) < 4
    check_drained(sched)


def test_eviction_is_least_recently_freed_first_and_from_a_chain_end():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    old, new = req("old", [1, 2, 3, 4, 5]), req("new", [6, 7, 8, 9, 10])
    for r in (old, new):
        prefix = kv.find_cached_prefix(r, None, None)
        assert kv.admit(r, prefix, 5)
        r.num_computed_tokens = 5
        kv.cache_computed_blocks(r)  # 2 full blocks each
    kv.free(old)
    kv.free(new)
    assert kv.num_free_blocks == 6 and kv.num_cached_blocks == 4
    taker = req("taker", [0] * 7)
    assert kv.admit(taker, kv.find_cached_prefix(taker, None, None), 7)  # 4 blocks: 2 uncached + 2 evicted
    # old's chain (freed first) went; new's chain is intact and still found.
    assert len(kv.find_cached_prefix(req("o", [1, 2, 3, 4, 5]), None, None).block_ids) == 0
    assert len(kv.find_cached_prefix(req("n", [6, 7, 8, 9, 10]), None, None).block_ids) == 2
    kv.check_invariants([taker])


def test_chain_end_is_evicted_before_its_start():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    r = req("r", [1, 2, 3, 4, 5, 6, 7])
    assert kv.admit(r, kv.find_cached_prefix(r, None, None), 7)  # 4 blocks
    r.num_computed_tokens = 7
    kv.cache_computed_blocks(r)  # 3 full blocks cached
    kv.free(r)
    taker = req("t", [9, 9, 9])
    assert kv.admit(taker, kv.find_cached_prefix(taker, None, None), 3)  # 1 uncached + 1 evicted
    probe = kv.find_cached_prefix(req("p", [1, 2, 3, 4, 5, 6, 7]), None, None)
    assert len(probe.block_ids) == 2  # the third (last) block went, the first two remain


def test_prompt_logprobs_requests_do_not_read_the_cache():
    sched = make_scheduler(block_size=BS)
    run_alone(sched, req("first", PROMPT))
    wants = req("wants", PROMPT, prompt_logprobs=1)
    sched.add_request(wants)
    out, _ = step(sched)
    assert scheduled(out, wants) == len(PROMPT)


def test_prefix_caching_off_shares_nothing():
    sched = make_scheduler(block_size=BS, enable_prefix_caching=False)
    run_alone(sched, req("first", PROMPT))
    second = req("second", PROMPT)
    sched.add_request(second)
    out, _ = step(sched)
    assert scheduled(out, second) == len(PROMPT)
    assert sched.kv_cache.num_cached_blocks == 0
    assert sched.prefix_cache_stats.snapshot() == {}


def test_a_failed_step_publishes_no_block():
    sched = make_scheduler(block_size=BS)
    first = req("first", PROMPT)
    sched.add_request(first)
    out = sched.schedule()
    sched.update(out, ModelRunnerOutput({}, failed={"first": "boom"}))
    assert first.status is RequestStatus.FINISHED
    assert sched.kv_cache.num_cached_blocks == 0
    second = req("second", PROMPT)
    sched.add_request(second)
    out, _ = step(sched)
    assert scheduled(out, second) == len(PROMPT)


def test_chunked_prefill_registers_blocks_as_chunks_complete():
    sched = make_scheduler(block_size=BS, long_prefill_token_threshold=6)
    first = req("first", PROMPT)
    sched.add_request(first)
    step(sched)  # 6 tokens: 1 full block
    assert sched.kv_cache.num_cached_blocks == 1
    second = req("second", PROMPT)
    sched.add_request(second)
    out, _ = step(sched)  # first: 6 more (3 blocks full); second found 1 block
    assert second.num_computed_tokens == 4 + scheduled(out, second)
    drive(sched)
    check_drained(sched)


def test_preempted_request_finds_its_own_blocks_again():
    # 8 blocks of 4; two requests with different prompts grow until one is preempted.
    sched = make_scheduler(block_size=BS, num_kv_blocks=8, max_model_len=32)
    old = req("old", [1] * 12, max_tokens=12)
    new = req("new", [2] * 12, max_tokens=12)
    sched.add_request(old)
    sched.add_request(new)
    trace = drive(sched)
    assert new.num_preemptions >= 1 and old.num_preemptions == 0
    # The prompts differ, so only the re-admission can hit: its own blocks, still cached.
    assert sched.prefix_cache_stats.total().hits > 0
    assert trace.tokens["new"] == new.output_token_ids
    check_drained(sched)
