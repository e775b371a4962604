"""The store as the scheduler sees it (AdapterResidency): loads, pins, LRU slots, pins for
good, the CPU tier's budget. Loads run in the test's thread (drain) on a fake clock."""

from __future__ import annotations

import pytest
import torch

from loramux.adapter_store.config import AdapterStoreConfig, AdapterStoreConfigError
from loramux.adapter_store.errors import AdapterNotFound, InvalidAdapterId, PinLimitExceeded
from loramux.adapter_store.store import AdapterStatus, AdapterStore
from loramux.scheduler.residency import AdapterResidency
from tests.adapter_store.store_fixtures import (
    TINY_SPEC,
    CountingLoader,
    FakeClock,
    adapter_bytes,
    make_buffers,
    make_store,
    write_adapter,
)

GRACE = 5.0
TTL = 2.0


@pytest.fixture
def adapter_dir(tmp_path):
    root = tmp_path / "adapters"
    for i, name in enumerate("abcde"):
        write_adapter(root, name, seed=i)
    return root


def started(adapter_dir, **kwargs):
    kwargs.setdefault("clock", FakeClock())
    kwargs.setdefault("fresh_grace_s", GRACE)
    store = make_store(adapter_dir, **kwargs)
    store.start(run_loader=False)
    return store


def load(store, *ids):
    for adapter_id in ids:
        store.prefetch(adapter_id)
    store.drain()


def use(store, adapter_id):
    """A request that ran and finished: one pin, one unpin."""
    slot = store.pin(adapter_id)
    assert slot is not None, adapter_id
    store.unpin(slot)
    return slot


def resident(store):
    return {i.adapter_id for i in store.list() if store.is_resident(i.adapter_id)}


def test_implements_adapter_residency(adapter_dir):
    store = started(adapter_dir, max_slots=3)
    assert isinstance(store, AdapterResidency)
    assert store.num_slots == 3


def test_prefetch_loads_and_pin_leases_the_slot(adapter_dir):
    store = started(adapter_dir, max_slots=2)
    assert store.info("a").status is AdapterStatus.REGISTERED
    assert not store.is_resident("a") and store.pin("a") is None
    store.prefetch("a")
    assert store.info("a").status is AdapterStatus.LOADING
    assert not store.is_resident("a")  # nothing happens before the loader runs
    store.drain()
    assert store.is_resident("a")
    info = store.info("a")
    assert (info.status, info.tier, info.num_leases) == (AdapterStatus.DEVICE, "device", 0)
    slot = store.pin("a")
    assert slot in (0, 1) and store.pin("a") == slot
    assert store.info("a").num_leases == 2
    store.unpin(slot)
    store.unpin(slot)
    assert store.info("a").num_leases == 0
    with pytest.raises(ValueError, match="no pin"):
        store.unpin(slot)
    stats = store.stats()
    assert (stats.device_hits, stats.device_misses, stats.loads) == (2, 1, 1)
    assert (stats.cpu_hits, stats.cpu_misses) == (0, 1)
    assert stats.num_device == 1 and stats.device_bytes == adapter_bytes()
    assert len(stats.load_latency_s) == 1


def test_prefetch_is_idempotent(adapter_dir):
    loader = CountingLoader()
    store = started(adapter_dir, max_slots=2, load_fn=loader)
    for _ in range(5):
        store.prefetch("a")
    store.drain()
    store.prefetch("a")  # resident: nothing to do
    store.drain()
    assert loader.calls == {"a": 1}
    assert store.stats().device_misses == 1


def test_device_slots_are_least_recently_used(adapter_dir):
    clock = FakeClock()
    store = started(adapter_dir, max_slots=2, clock=clock)
    load(store, "a", "b")
    use(store, "b")
    use(store, "a")  # a is the most recently used now
    load(store, "c")
    assert resident(store) == {"a", "c"}
    use(store, "c")
    load(store, "b")
    assert resident(store) == {"b", "c"}
    assert store.stats().device_evictions == 2


def test_fresh_adapter_stays_until_pinned_once_or_grace_ends(adapter_dir):
    clock = FakeClock()
    store = started(adapter_dir, max_slots=2, clock=clock)
    load(store, "a", "b")  # both fresh: never pinned yet
    load(store, "c")
    assert resident(store) == {"a", "b"}
    assert store.info("c").status is AdapterStatus.CPU  # read, waiting for a slot
    use(store, "a")  # a pinned once: evictable now
    store.drain()
    assert resident(store) == {"b", "c"}
    load(store, "d")
    assert resident(store) == {"b", "c"}  # b and c are fresh
    clock.now += GRACE
    load(store, "d")  # asked again, as the scheduler does while d's request waits
    assert resident(store) in ({"c", "d"}, {"b", "d"})


def test_a_prefetch_not_repeated_expires(adapter_dir):
    clock = FakeClock()
    store = started(adapter_dir, max_slots=2, clock=clock, prefetch_ttl_s=TTL)
    load(store, "a", "b")
    slot_a, slot_b = store.pin("a"), store.pin("b")  # every slot leased: c has to wait
    load(store, "c")
    clock.now += TTL / 2
    store.prefetch("c")  # repeated: the ask lives on
    clock.now += TTL * 0.75
    store.unpin(slot_a)
    store.drain()
    assert store.is_resident("c")
    load(store, "d")
    assert store.stats().num_loading == 1
    clock.now += TTL * 1.5  # not repeated: nobody waits for d any more
    store.unpin(slot_b)
    store.drain()
    assert not store.is_resident("d") and store.stats().num_loading == 0
    assert store.info("d").status is AdapterStatus.CPU  # what was read stays in RAM
    load(store, "d")  # asked again: loads
    assert store.is_resident("d")


def test_stale_asks_do_not_delay_a_current_one(adapter_dir):
    """The head-of-line case: the scheduler now asks for e only (its oldest request waits
    for it); the loads asked for earlier and never again go, e loads first."""
    clock = FakeClock()
    store = started(adapter_dir, max_slots=2, clock=clock, prefetch_ttl_s=TTL)
    load(store, "a", "b")
    slots = store.pin("a"), store.pin("b")
    for name in "cde":
        store.prefetch(name)
    clock.now += TTL * 0.75
    store.prefetch("e")
    clock.now += TTL * 0.5  # c and d were asked for TTL * 1.25 ago, e TTL * 0.5 ago
    store.unpin(slots[0])
    store.drain()
    assert resident(store) == {"b", "e"}
    assert store.stats().num_loading == 0
    store.unpin(slots[1])


def test_loads_for_pins_for_good_never_expire(adapter_dir):
    clock = FakeClock()
    store = started(adapter_dir, max_slots=2, clock=clock, prefetch_ttl_s=TTL)
    load(store, "a", "b")
    slots = store.pin("a"), store.pin("b")
    store.pin_permanent("c")
    store.prefetch("c")  # also asked for by a request: still never expires
    clock.now += TTL * 10
    store.unpin(slots[0])
    store.drain()
    assert store.is_resident("c")
    store.unpin(slots[1])


def test_pinned_slots_are_never_evicted(adapter_dir):
    clock = FakeClock()
    store = started(adapter_dir, max_slots=2, clock=clock)
    load(store, "a", "b")
    slot_a, slot_b = store.pin("a"), store.pin("b")
    clock.now += 100
    load(store, "c")
    assert not store.is_resident("c") and resident(store) == {"a", "b"}
    store.unpin(slot_b)
    store.drain()
    assert resident(store) == {"a", "c"}
    assert store.pin("c") == slot_b
    assert store.is_resident("a") and store.info("a").num_leases == 1
    store.unpin(slot_a)


def test_permanently_pinned_adapter_stays_through_churn(adapter_dir):
    clock = FakeClock()
    store = started(adapter_dir, max_slots=2, clock=clock, pinned=("a",))
    assert store.info("a").pinned
    store.drain()  # --pin loads at start
    slot_a = store.pin("a")
    store.unpin(slot_a)
    for name in "bcdebcde":
        clock.now += 10
        load(store, name)
        assert store.is_resident(name)
        use(store, name)
        assert store.is_resident("a") and store.pin("a") == slot_a
        store.unpin(slot_a)
    store.unpin_permanent("a")
    clock.now += 10
    load(store, "b", "c")
    assert not store.is_resident("a")


def test_pin_limits(adapter_dir):
    store = started(adapter_dir, max_slots=3)
    store.pin_permanent("a")
    store.pin_permanent("b")
    store.pin_permanent("b")  # idempotent
    with pytest.raises(PinLimitExceeded, match="no device slot"):
        store.pin_permanent("c")
    with pytest.raises(AdapterNotFound):
        store.pin_permanent("nope")
    store.unpin_permanent("b")
    store.pin_permanent("c")
    assert store.stats().num_pinned == 2
    with pytest.raises(AdapterNotFound):
        started(adapter_dir, max_slots=3, pinned=("nope",))
    with pytest.raises(PinLimitExceeded):
        started(adapter_dir, max_slots=2, pinned=("a", "b"))


def test_cpu_tier_budget_hits_and_misses(adapter_dir):
    clock = FakeClock()
    size = adapter_bytes()
    store = started(adapter_dir, max_slots=1, clock=clock, cpu_cache_bytes=2 * size + size // 2)
    for name in "abc":  # one slot: each evicts the previous one; the CPU tier keeps two
        clock.now += 10
        load(store, name)
        use(store, name)
        assert store.stats().cpu_bytes <= 2 * size + size // 2
    stats = store.stats()
    assert (stats.cpu_misses, stats.cpu_hits, stats.num_cpu) == (3, 0, 2)
    assert stats.cpu_evictions == 1
    assert store.info("a").tier == "disk" and store.info("b").tier == "cpu"
    clock.now += 10
    load(store, "b")  # from RAM
    assert store.stats().cpu_hits == 1
    clock.now += 10
    load(store, "a")  # from disk again
    assert store.stats().cpu_misses == 4
    assert store.stats().cpu_bytes <= 2 * size + size // 2


def test_zero_cpu_budget_still_loads(adapter_dir):
    store = started(adapter_dir, max_slots=2, cpu_cache_bytes=0)
    load(store, "a")
    assert store.is_resident("a") and store.stats().num_cpu == 0


def test_adapter_waiting_for_a_slot_loads_when_one_frees(adapter_dir):
    clock = FakeClock()
    store = started(adapter_dir, max_slots=1, clock=clock, cpu_cache_bytes=0)
    load(store, "a")
    slot = store.pin("a")
    load(store, "b")
    assert store.info("b").status is AdapterStatus.LOADING  # in the loader's hand
    store.unpin(slot)
    store.drain()
    assert resident(store) == {"b"}
    assert store.stats().cpu_misses == 2  # b was read once, not again


def test_store_checks_its_buffers_and_config(tmp_path):
    config = AdapterStoreConfig()
    with pytest.raises(ValueError, match="the store serves"):
        AdapterStore(config, TINY_SPEC, make_buffers(), torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="no LoRA buffers"):
        AdapterStore(config, TINY_SPEC, {}, torch.float32, "cpu")
    partial = make_buffers()
    partial.pop((1, "q_proj"))
    with pytest.raises(ValueError, match="missing"):
        AdapterStore(config, TINY_SPEC, partial, torch.float32, "cpu")
    for bad in [dict(cpu_cache_bytes=-1), dict(eviction_policy="random"), dict(fresh_grace_s=-1)]:
        with pytest.raises(AdapterStoreConfigError):
            AdapterStoreConfig(**bad)
    with pytest.raises(InvalidAdapterId):
        AdapterStoreConfig(pinned=("../x",))
    assert AdapterStoreConfig(adapter_dirs=str(tmp_path), pinned="a").pinned == ("a",)
    with pytest.raises(AdapterStoreConfigError, match="cannot read adapter dir"):
        make_store(tmp_path / "missing").start(run_loader=False)
