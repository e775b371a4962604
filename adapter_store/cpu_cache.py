"""The CPU tier: validated adapters in the serving dtype, kept in RAM within a byte budget.

It is a cache in front of the disk: the device tier does not depend on it (a device slot
holds its own copy), so anything here may be evicted at any time. Keys are
(adapter_id, version), so a replaced adapter's old weights are never served for the new one.
Its memory is an arena (cpu_arena.py): `allocate` hands the loader a block for the next
adapter, evicting by policy when no free range fits, so evicted adapters' memory is
recycled and loads do not fault in fresh pages.
Not thread-safe on its own: the store calls it under its lock.
"""

from __future__ import annotations

import torch

from loramux.adapter_store.cpu_arena import CpuArena, fresh_alloc
from loramux.adapter_store.eviction import EvictionPolicy
from loramux.adapter_store.format import LoraAdapter

CacheKey = tuple[str, int]  # (adapter_id, version)


class CpuCache:
    def __init__(
        self, budget_bytes: int, policy: EvictionPolicy[CacheKey], arena: CpuArena | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self._policy = policy
        self._adapters: dict[CacheKey, LoraAdapter] = {}
        self.arena = arena
        self.num_bytes = 0  # sum of num_bytes over cached adapters; always <= budget_bytes
        self.num_evictions = 0
        self.num_fresh_allocations = 0  # blocks the arena could not serve (fresh memory)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """uint8 [nbytes] for an adapter about to be loaded: from the arena, evicting by
        policy until a free range fits; fresh memory when nothing left to evict frees one
        (the victims are still referenced elsewhere, or there is no arena)."""
        while self.arena is not None:
            block = self.arena.allocate(nbytes)
            if block is not None:
                return block
            if not self._adapters:
                break
            self.discard(next(self._policy.victims()))
            self.num_evictions += 1
        self.num_fresh_allocations += 1
        return fresh_alloc(nbytes)

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._adapters

    def get(self, key: CacheKey) -> LoraAdapter | None:
        """The cached adapter (now the most recently used), or None."""
        adapter = self._adapters.get(key)
        if adapter is not None:
            self._policy.record_use(key)
        return adapter

    def put(self, key: CacheKey, adapter: LoraAdapter) -> list[CacheKey]:
        """Cache `adapter`, evicting by policy until it fits; returns the evicted keys.

        An adapter larger than the whole budget is not cached (and nothing is evicted).
        """
        if adapter.num_bytes > self.budget_bytes:
            return []
        self.discard(key)
        evicted: list[CacheKey] = []
        while self.num_bytes + adapter.num_bytes > self.budget_bytes:
            victim = next(self._policy.victims())
            self.discard(victim)
            evicted.append(victim)
        self._adapters[key] = adapter
        self.num_bytes += adapter.num_bytes
        self._policy.record_use(key)
        self.num_evictions += len(evicted)
        return evicted

    def discard(self, key: CacheKey) -> bool:
        adapter = self._adapters.pop(key, None)
        if adapter is None:
            return False
        self.num_bytes -= adapter.num_bytes
        self._policy.forget(key)
        return True
