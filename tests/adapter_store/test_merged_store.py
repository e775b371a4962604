"""Merged adapters in the store: built once per spec and source versions, cached and counted
in bytes like any adapter, evicted from both tiers and rebuilt identically, bounded in number."""

from __future__ import annotations

import pytest
import torch

from loramux.adapter_store.errors import AdapterNotFound, InvalidAdapterId
from loramux.adapter_store.format import load_adapter
from loramux.adapter_store.merge import MergeSpec, MergeSpecInvalid, merge_adapters
from loramux.adapter_store.merged import RECENT_S, MergeCapacity, MergeSourceNotFound
from loramux.adapter_store.records import AdapterStatus
from tests.adapter_store.store_fixtures import (
    MAX_RANK,
    FakeClock,
    TINY_SPEC,
    adapter_bytes,
    assert_slot_holds,
    make_store,
    write_adapter,
)


@pytest.fixture
def adapter_dir(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root, "a", seed=1, targets=("q_proj", "v_proj"))
    write_adapter(root, "b", seed=2, targets=("q_proj", "o_proj"), alpha=4.0)
    write_adapter(root, "c", seed=3, targets=("q_proj", "v_proj"))
    write_adapter(root, "wide", seed=4, r=8, targets=("q_proj",))
    return root


def load(store, adapter_id):
    store.prefetch(adapter_id)
    store.drain()
    return store.pin(adapter_id)


def expected(adapter_dir, spec: MergeSpec, dtype=torch.float32):
    sources = [load_adapter(i, adapter_dir / i, TINY_SPEC, MAX_RANK) for i in spec.ids]
    return merge_adapters("x", spec, sources, dtype)


def test_built_once_per_spec_then_served_from_the_tiers(adapter_dir):
    events = []
    store = make_store(adapter_dir, on_load=events.append).start(run_loader=False)
    spec = MergeSpec.create(["a", "b"], [0.6, 0.4], "ties", 0.5)
    merged_id = store.merges.resolve(spec)
    assert merged_id.startswith("merge-")
    assert store.merges.resolve(MergeSpec.create(["a", "b"], [0.6, 0.4], "ties", 0.5)) == merged_id
    info = store.info(merged_id)
    assert (info.source, info.rank, info.target_modules) == ("merge", 4, ("q_proj", "v_proj", "o_proj"))
    assert info.num_bytes == adapter_bytes(targets=("q_proj", "v_proj", "o_proj"))
    assert store.merges.num_builds == 0  # registered from the configs; weights wait for a request

    slot = load(store, merged_id)
    assert slot is not None and store.merges.num_builds == 1
    assert [(e.adapter_id, e.source, e.ok) for e in events] == [(merged_id, "merge", True)]
    assert_slot_holds(store, slot, expected(adapter_dir, spec))
    store.unpin(slot)
    assert store.pin(merged_id) == slot and store.merges.num_builds == 1  # a device hit
    store.unpin(slot)
    stats = store.stats()
    assert stats.cpu_bytes == info.num_bytes  # counted in bytes like any adapter

    other = store.merges.resolve(MergeSpec.create(["a", "b"], [0.6, 0.4], "ties", 0.6))
    assert other != merged_id  # another density is another merge


def test_evicted_merge_is_rebuilt_identically(adapter_dir, tmp_path):
    # one slot, a CPU tier too small for two adapters: loading `c` evicts the merge from both
    store = make_store(adapter_dir, max_slots=1, fresh_grace_s=0.0,
                       cpu_cache_bytes=adapter_bytes() + 1).start(run_loader=False)
    spec = MergeSpec.create(["a", "c"], [1.0, 0.5], "dare_ties", 0.5)
    merged_id = store.merges.resolve(spec)
    slot = load(store, merged_id)
    first = {k: b.lora_a[slot].clone() for k, b in store._buffers.items()}
    store.unpin(slot)
    store.unpin(load(store, "c"))
    assert store.info(merged_id).status is AdapterStatus.REGISTERED  # evicted from both tiers
    assert store.stats().device_evictions == 1 and store.stats().cpu_evictions >= 1
    slot = load(store, merged_id)
    assert store.merges.num_builds == 2
    for key, b in store._buffers.items():
        assert torch.equal(b.lora_a[slot], first[key]), key  # DARE is seeded by the spec
    assert_slot_holds(store, slot, expected(adapter_dir, spec))


def test_a_replaced_source_makes_a_new_merge(adapter_dir, tmp_path):
    store = make_store(adapter_dir).start(run_loader=False)
    spec = MergeSpec.create(["a", "b"])
    before = store.merges.resolve(spec)
    store.register_directory("b", write_adapter(tmp_path / "v2", "b", seed=9, targets=("q_proj", "o_proj")))
    after = store.merges.resolve(spec)
    assert after != before
    slot = load(store, after)
    sources = [load_adapter("a", adapter_dir / "a", TINY_SPEC, MAX_RANK),
               load_adapter("b", tmp_path / "v2" / "b", TINY_SPEC, MAX_RANK)]
    assert_slot_holds(store, slot, merge_adapters("x", spec, sources))


def test_bad_merges_are_refused_before_any_weights_are_read(adapter_dir):
    store = make_store(adapter_dir).start(run_loader=False)
    with pytest.raises(MergeSourceNotFound) as info:
        store.merges.resolve(MergeSpec.create(["a", "nope"]))
    assert info.value.field == "ids"
    with pytest.raises(MergeSpecInvalid, match="ranks 4 and 8") as info:
        store.merges.resolve(MergeSpec.create(["a", "wide"]))
    assert info.value.field == "ids"
    merged_id = store.merges.resolve(MergeSpec.create(["a"]))
    with pytest.raises(MergeSpecInvalid, match="merged adapter"):
        store.merges.resolve(MergeSpec.create([merged_id]))
    assert store.merges.num_builds == 0


def test_users_cannot_take_derived_ids(adapter_dir, tmp_path):
    store = make_store(adapter_dir).start(run_loader=False)
    with pytest.raises(InvalidAdapterId, match="reserved"):
        store.register_directory("merge-0123", adapter_dir / "a")


def test_number_of_merges_is_bounded_and_in_use_or_recent_ones_are_kept(adapter_dir):
    clock = FakeClock(100.0)
    store = make_store(adapter_dir, max_merged_adapters=2, clock=clock, fresh_grace_s=0.0).start(run_loader=False)
    first = store.merges.resolve(MergeSpec.create(["a", "c"], [1, 2]))
    second = store.merges.resolve(MergeSpec.create(["a", "c"], [1, 3]))
    with pytest.raises(MergeCapacity):  # both were resolved moments ago: their requests may be queued
        store.merges.resolve(MergeSpec.create(["a", "c"], [1, 4]))
    clock.now += RECENT_S + 1
    slot = load(store, first)  # held by a running request
    third = store.merges.resolve(MergeSpec.create(["a", "c"], [1, 4]))
    with pytest.raises(AdapterNotFound):
        store.info(second)  # the least recently resolved idle one made room
    assert store.info(first).num_leases == 1
    clock.now += RECENT_S + 1
    slot3 = load(store, third)
    with pytest.raises(MergeCapacity):  # first and third are held by running requests
        store.merges.resolve(MergeSpec.create(["a", "c"], [1, 5]))
    store.unpin(slot)
    store.unpin(slot3)
    assert store.merges.resolve(MergeSpec.create(["a", "c"], [1, 5]))
    with pytest.raises(AdapterNotFound):
        store.info(first)
