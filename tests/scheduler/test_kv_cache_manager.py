"""KVCacheManager: block accounting without tensors."""

import pytest

from loramux.scheduler.kv_cache_manager import KVCacheManager
from tests.scheduler.harness import make_request


def test_allocation_grows_to_cover_computed_plus_new_tokens():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    request = make_request(prompt_len=9)
    assert kv.allocate_slots(request, 5)  # tokens 0..4 -> 2 blocks
    assert len(request.block_ids) == 2
    request.num_computed_tokens = 5
    assert kv.allocate_slots(request, 3)  # tokens 0..7 still fit in 2 blocks
    assert len(request.block_ids) == 2
    request.num_computed_tokens = 8
    assert kv.allocate_slots(request, 1)  # token 8 opens a third block
    assert len(request.block_ids) == 3
    assert kv.num_free_blocks == 7
    assert kv.usage == pytest.approx(0.3)


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = make_request(prompt_len=8), make_request(prompt_len=8)
    assert kv.allocate_slots(a, 8)
    assert not kv.allocate_slots(b, 8)  # needs 2, 1 free
    assert b.block_ids == [] and kv.num_free_blocks == 1
    assert kv.allocate_slots(b, 4)


def test_free_returns_every_block_and_blocks_are_never_shared():
    kv = KVCacheManager(num_blocks=6, block_size=2)
    requests = [make_request(prompt_len=4) for _ in range(3)]
    for request in requests:
        assert kv.allocate_slots(request, 4)
    held = [b for r in requests for b in r.block_ids]
    assert sorted(held) == list(range(6))
    for request in requests:
        kv.free(request)
        assert request.block_ids == []
    kv.free(requests[0])  # freeing nothing is a no-op
    assert kv.num_free_blocks == 6 and kv.usage == 0.0


def test_double_free_is_caught():
    kv = KVCacheManager(num_blocks=2, block_size=2)
    request = make_request(prompt_len=2)
    assert kv.allocate_slots(request, 2)
    stale = list(request.block_ids)
    kv.free(request)
    request.block_ids = stale
    with pytest.raises(AssertionError, match="freed twice"):
        kv.free(request)
