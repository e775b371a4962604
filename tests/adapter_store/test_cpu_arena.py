"""The CPU tier as an arena: adapter loads reuse memory faulted in before (a pool sized by
cpu_cache_bytes, faulted in ahead, evicted adapters' blocks recycled), with its accounting."""

from __future__ import annotations

import gc

import pytest
import torch

from loramux.adapter_store.config import AdapterStoreConfig, AdapterStoreConfigError
from loramux.adapter_store.cpu_arena import ALIGN, BlockCarver, CpuArena
from loramux.adapter_store.cpu_cache import CpuCache
from loramux.adapter_store.eviction import LRUPolicy
from loramux.adapter_store.format import load_adapter
from tests.adapter_store.store_fixtures import (
    MAX_RANK,
    TINY_SPEC,
    adapter_bytes,
    make_store,
    slot_contents,
    write_adapter,
)

MIB = 1 << 20


def _address(block: torch.Tensor) -> int:
    return block.data_ptr()


def test_a_released_block_is_recycled_at_the_same_address():
    arena = CpuArena(4 * MIB, prefault_ahead_bytes=0)
    first = arena.allocate(1000)
    address = _address(first)
    assert arena.stats().used_bytes == 1024  # rounded up to the 64-byte alignment
    del first
    second = arena.allocate(1000)
    assert _address(second) == address
    stats = arena.stats()
    assert stats.num_allocations == 2 and stats.num_recycled == 1 and stats.num_unfaulted == 1
    assert stats.used_bytes == 1024


def test_a_block_is_not_reused_while_a_view_of_it_lives():
    arena = CpuArena(4 * MIB, prefault_ahead_bytes=0)
    block = arena.allocate(4096)
    view = block[128:256].view(torch.float32)  # an adapter's tensor carved from the block
    view.fill_(7.0)
    del block
    gc.collect()
    other = arena.allocate(4096)
    other.fill_(0)
    assert _address(other) != view.data_ptr() - 128
    assert torch.all(view == 7.0)  # untouched by the second block
    assert arena.stats().used_bytes == 2 * 4096
    del view
    assert arena.stats().used_bytes == 4096


def test_freed_neighbours_merge_into_one_range():
    arena = CpuArena(MIB, prefault_ahead_bytes=0)
    blocks = [arena.allocate(MIB // 4) for _ in range(4)]
    assert arena.allocate(1) is None  # full
    del blocks[1], blocks[1]  # the middle two
    merged = arena.allocate(MIB // 2)  # fits only if the two ranges merged
    assert merged is not None
    del blocks, merged
    assert arena.stats().used_bytes == 0
    assert arena.allocate(MIB) is not None  # everything merged back into one range


def test_prefault_runs_ahead_of_the_highest_block_then_stops():
    arena = CpuArena(64 * MIB, prefault_ahead_bytes=12 * MIB)
    steps = 0
    while arena.prefault_step():
        steps += 1
    assert steps >= 3  # chunked: a load never waits long behind it
    assert arena.stats().faulted_bytes == 12 * MIB
    blocks = [arena.allocate(3 * MIB) for _ in range(4)]  # all inside the faulted part
    stats = arena.stats()
    assert stats.num_unfaulted == 0 and stats.num_recycled == 4
    while arena.prefault_step():  # the high-water mark moved: 12 MiB ahead of it again
        pass
    assert arena.stats().faulted_bytes == 24 * MIB
    del blocks


def test_prefault_stops_at_the_capacity():
    arena = CpuArena(8 * MIB, prefault_ahead_bytes=1 << 30)
    while arena.prefault_step():
        pass
    assert arena.stats().faulted_bytes == 8 * MIB


def test_carved_tensors_are_aligned_and_fill_the_planned_block():
    planned = [((3, 5), torch.float32), ((7,), torch.bfloat16), ((2, 2, 2), torch.float64)]
    nbytes = BlockCarver.nbytes(planned)
    assert nbytes == 64 + 64 + 64
    block = torch.zeros(nbytes, dtype=torch.uint8)
    carver = BlockCarver(block)
    tensors = [carver.take(shape, dtype) for shape, dtype in planned]
    for tensor, (shape, dtype) in zip(tensors, planned):
        assert tensor.shape == shape and tensor.dtype == dtype
        assert (tensor.data_ptr() - block.data_ptr()) % ALIGN == 0


def test_the_cpu_cache_evicts_to_make_room_in_its_arena(tmp_path):
    size = adapter_bytes()
    arena = CpuArena(2 * size + 4 * ALIGN * 8, prefault_ahead_bytes=0)
    cache = CpuCache(2 * size, LRUPolicy(), arena)
    dirs = [write_adapter(tmp_path, name, seed=i) for i, name in enumerate("abc")]
    loaded = {}
    for name, directory in zip("ab", dirs):
        loaded[name] = load_adapter(name, directory, TINY_SPEC, MAX_RANK, alloc=cache.allocate)
        cache.put((name, 1), loaded[name])
    address_a = next(iter(loaded["a"].modules.values())).lora_a.data_ptr()
    del loaded  # only the cache holds them now
    # A third adapter: no free range fits, so the least recently used (a) is evicted, and
    # its block is reused.
    c = load_adapter("c", dirs[2], TINY_SPEC, MAX_RANK, alloc=cache.allocate)
    assert ("a", 1) not in cache and ("b", 1) in cache and cache.num_evictions == 1
    assert next(iter(c.modules.values())).lora_a.data_ptr() == address_a
    assert cache.num_fresh_allocations == 0
    expected = load_adapter("c", dirs[2], TINY_SPEC, MAX_RANK)  # fresh memory, the reference
    for key, weights in expected.modules.items():
        assert torch.equal(c.modules[key].lora_a, weights.lora_a)
        assert torch.equal(c.modules[key].lora_b, weights.lora_b)
    assert c.num_bytes == expected.num_bytes


def test_the_cpu_cache_falls_back_to_fresh_memory_when_victims_are_still_held(tmp_path):
    size = adapter_bytes()
    arena = CpuArena(size + 4 * ALIGN * 8, prefault_ahead_bytes=0)
    cache = CpuCache(size, LRUPolicy(), arena)
    dirs = [write_adapter(tmp_path, name, seed=i) for i, name in enumerate("ab")]
    held = load_adapter("a", dirs[0], TINY_SPEC, MAX_RANK, alloc=cache.allocate)
    cache.put(("a", 1), held)
    b = load_adapter("b", dirs[1], TINY_SPEC, MAX_RANK, alloc=cache.allocate)  # `held` pins a's block
    assert cache.num_fresh_allocations == 1 and len(cache) == 0  # evicted, yet not freed
    assert torch.isfinite(next(iter(b.modules.values())).lora_a).all()
    assert arena.stats().used_bytes >= held.num_bytes


def test_store_loads_reuse_the_prefaulted_arena_and_evicted_blocks(tmp_path):
    root = tmp_path / "adapters"
    names = [f"a{i}" for i in range(8)]
    for i, name in enumerate(names):
        write_adapter(root, name, seed=i)
    size = adapter_bytes()
    # Room for 3 adapters in the CPU tier, 2 slots: loads evict in both tiers.
    store = make_store(root, max_slots=2, cpu_cache_bytes=3 * size + 4096, cpu_prefault_bytes=1 << 30)
    store.start(run_loader=False)
    while store._loader_step():  # nothing queued: the loader's idle work faults the arena in
        pass
    capacity = store.arena_stats().capacity_bytes
    assert store.arena_stats().faulted_bytes == capacity >= 3 * size
    for _ in range(2):
        for name in names:
            store.prefetch(name)
            store.drain()
            slot = store.pin(name)
            assert slot is not None
            contents = slot_contents(store, slot)
            expected = load_adapter(name, root / name, TINY_SPEC, MAX_RANK)
            for key, weights in expected.modules.items():
                lora_a, lora_b, rank = contents[key]  # [max_rank, in], [max_rank, out]
                assert rank == 4
                assert torch.equal(lora_a[:4], weights.lora_a)
                torch.testing.assert_close(lora_b[:4], weights.scaling * weights.lora_b.T)
            store.unpin(slot)
    stats, arena = store.stats(), store.arena_stats()
    assert stats.cpu_evictions > 0 and stats.cpu_bytes <= stats.cpu_budget_bytes
    assert arena.num_allocations == stats.cpu_misses == 16
    assert arena.num_unfaulted == 0 and arena.num_recycled == 16  # never fresh pages
    assert arena.used_bytes <= capacity
    store.close()


def test_no_cpu_tier_means_no_arena(tmp_path):
    write_adapter(tmp_path, "a")
    store = make_store(tmp_path, cpu_cache_bytes=0).start(run_loader=False)
    assert store.arena_stats() is None
    store.prefetch("a")
    store.drain()
    assert store.pin("a") is not None
    store.close()


def test_config_refuses_a_negative_prefault():
    with pytest.raises(AdapterStoreConfigError, match="cpu_prefault_bytes"):
        AdapterStoreConfig(cpu_prefault_bytes=-1)


def test_a_store_of_small_adapters_faults_in_little(tmp_path):
    """The window faulted in ahead is sized by the largest adapter the slots take (32 of
    them), capped by cpu_prefault_bytes: a 1 GiB tier of tiny adapters faults in ~2 MiB."""
    write_adapter(tmp_path, "a")
    store = make_store(tmp_path, cpu_cache_bytes=1 << 30).start(run_loader=False)
    while store._loader_step():
        pass
    arena = store.arena_stats()
    assert arena.capacity_bytes > 1 << 30
    assert arena.faulted_bytes == arena.prefault_target_bytes < 4 * MIB
    store.close()
