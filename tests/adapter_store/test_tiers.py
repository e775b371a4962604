"""The tiers' bookkeeping alone: LRU order, the CPU tier's byte budget, the slot table."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loramux.adapter_store.cpu_cache import CpuCache
from loramux.adapter_store.eviction import POLICIES, LRUPolicy, make_policy
from loramux.adapter_store.slots import SlotState, SlotTable


def test_lru_order():
    lru = LRUPolicy()
    for key in "abcd":
        lru.record_use(key)
    lru.record_use("b")
    lru.forget("c")
    lru.forget("zz")  # unknown: no-op
    assert list(lru.victims()) == ["a", "d", "b"]
    assert len(lru) == 3
    assert isinstance(make_policy("lru"), LRUPolicy) and "lru" in POLICIES


def _adapter(num_bytes: int):
    return SimpleNamespace(num_bytes=num_bytes)  # all the cache reads of an adapter


def test_cpu_cache_evicts_least_recently_used_by_bytes():
    cache = CpuCache(100, LRUPolicy())
    assert cache.put(("a", 1), _adapter(40)) == []
    assert cache.put(("b", 1), _adapter(40)) == []
    cache.get(("a", 1))  # b is now the least recently used
    assert cache.put(("c", 1), _adapter(30)) == [("b", 1)]
    assert cache.num_bytes == 70 and ("a", 1) in cache and ("c", 1) in cache
    # Making room for a big one takes several.
    assert cache.put(("d", 1), _adapter(100)) == [("a", 1), ("c", 1)]
    assert cache.num_bytes == 100 and cache.num_evictions == 3
    # Larger than the whole budget: not cached, nothing evicted.
    assert cache.put(("e", 1), _adapter(101)) == []
    assert ("e", 1) not in cache and ("d", 1) in cache
    assert cache.discard(("d", 1)) and not cache.discard(("d", 1))
    assert cache.num_bytes == 0 and len(cache) == 0


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(0, 200),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["put", "get", "discard"]), st.integers(0, 7), st.integers(1, 120)
        ),
        max_size=60,
    ),
)
def test_cpu_cache_never_exceeds_its_budget(budget, ops):
    cache = CpuCache(budget, LRUPolicy())
    model: dict = {}  # key -> size, in LRU order (a reference implementation)
    for op, k, size in ops:
        key = (f"a{k}", 1)
        if op == "put":
            evicted = cache.put(key, _adapter(size))
            if size <= budget:
                model.pop(key, None)
                expected = []
                while sum(model.values()) + size > budget:
                    expected.append(next(iter(model)))
                    del model[expected[-1]]
                model[key] = size
                assert evicted == expected
            else:
                assert evicted == []
        elif op == "get":
            assert (cache.get(key) is not None) == (key in model)
            if key in model:
                model[key] = model.pop(key)
        else:
            assert cache.discard(key) == (model.pop(key, None) is not None)
        assert cache.num_bytes == sum(model.values()) <= budget
        assert len(cache) == len(model)


# ------------------------------------------------------------------ slot table


def test_slot_table_prefers_free_slots_then_lru_victims():
    table = SlotTable(2, LRUPolicy())
    for owner in ("a", "b"):
        slot, evicted = table.reserve(now=0.0)
        assert evicted is None
        table.publish(slot, owner, 10, fresh_until=None, protected=False)
    table.pin(0)
    table.unpin(0)  # "a" used after "b"
    assert table.reserve(now=0.0) == (1, "b")
    assert table.state(1) is SlotState.LOADING
    assert table.reserve(now=0.0) == (0, "a")
    assert table.reserve(now=0.0) is None  # both loading
    assert table.num_evictions == 2


def test_leased_protected_and_fresh_slots_are_never_reserved():
    table = SlotTable(3, LRUPolicy())
    for owner in ("leased", "protected", "fresh"):
        slot, _ = table.reserve(now=0.0)
        fresh_until = 5.0 if owner == "fresh" else None
        table.publish(slot, owner, 1, fresh_until, protected=owner == "protected")
    table.pin(0)
    assert table.reserve(now=4.9) is None
    assert table.reserve(now=5.0) == (2, "fresh")  # the grace period is over
    table.set_protected(1, False)
    assert table.reserve(now=5.0) == (1, "protected")
    with pytest.raises(ValueError, match="no pin"):
        table.unpin(1)


def test_retired_slot_is_freed_by_the_last_unpin():
    table = SlotTable(1, LRUPolicy())
    table.reserve(now=0.0)
    table.publish(0, "v1", 1, fresh_until=None, protected=False)
    table.pin(0)
    table.pin(0)
    assert not table.retire(0)
    assert table.reserve(now=0.0) is None  # still serving two leases
    assert table.unpin(0) is None
    assert table.unpin(0) == "v1"
    assert table.state(0) is SlotState.FREE
    assert table.reserve(now=0.0) == (0, None)


@settings(max_examples=80, deadline=None)
@given(
    num_slots=st.integers(1, 4),
    ops=st.lists(
        st.tuples(
            st.sampled_from(["reserve", "publish", "pin", "unpin", "retire", "protect", "tick"]),
            st.integers(0, 3),
        ),
        max_size=80,
    ),
)
def test_slot_table_invariants(num_slots, ops):
    """Random operations: a leased, protected or fresh slot is never reserved (so never
    written), pins are counted exactly, and retired slots free on their last unpin."""
    table = SlotTable(num_slots, LRUPolicy())
    now = 0.0
    loading: list[int] = []
    leases = [0] * num_slots
    owners = 0
    for op, arg in ops:
        slot = arg % num_slots
        if op == "reserve":
            before = [
                (table.state(i), table.refs(i), table.is_protected(i), table.is_evictable(i, now))
                for i in range(num_slots)
            ]
            got = table.reserve(now)
            if got is None:
                assert all(s is not SlotState.FREE and not ev for s, _, _, ev in before)
            else:
                taken, _ = got
                state, refs, protected, evictable = before[taken]
                assert refs == 0 and not protected
                assert state is SlotState.FREE or evictable
                loading.append(taken)
        elif op == "publish" and loading:
            owners += 1
            table.publish(loading.pop(0), f"v{owners}", 1, now + 2.0, protected=False)
        elif op == "pin" and table.state(slot) is SlotState.READY and not table.is_retired(slot):
            table.pin(slot)
            leases[slot] += 1
        elif op == "unpin" and leases[slot]:
            freed = table.unpin(slot)
            leases[slot] -= 1
            assert (freed is not None) == (table.state(slot) is SlotState.FREE)
        elif op == "retire" and table.state(slot) is SlotState.READY and not table.is_retired(slot):
            assert table.retire(slot) == (leases[slot] == 0)
        elif op == "protect" and table.state(slot) is SlotState.READY:
            table.set_protected(slot, not table.is_protected(slot))
        elif op == "tick":
            now += 1.0
        for i in range(num_slots):
            assert table.refs(i) == leases[i]
            if leases[i]:
                assert table.state(i) is SlotState.READY
        assert table.num_leased == sum(1 for n in leases if n)
