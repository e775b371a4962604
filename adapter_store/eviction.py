"""Eviction policies: in which order a tier gives up the things it caches.

A policy only orders keys; the tier decides what may go (a leased or permanently pinned
device slot never may) and skips those. Both tiers use the same protocol: the CPU tier
with (adapter_id, version) keys, the device tier with slot numbers. Callers hold the
store's lock, so a policy needs no locking of its own; record_use and forget should be
O(1), since the engine thread records every pin.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(Protocol[K]):
    def record_use(self, key: K) -> None: ...  # key was added or used just now

    def forget(self, key: K) -> None: ...  # key left the tier (no-op if unknown)

    # Every key, the one to evict first first. Lazy: the caller picks a victim, stops
    # iterating, then evicts (the iterator is invalid once the policy changes).
    def victims(self) -> Iterator[K]: ...

    def __len__(self) -> int: ...


class LRUPolicy(Generic[K]):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()  # oldest use first

    def record_use(self, key: K) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: K) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[K]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


# Policy name (AdapterStoreConfig.eviction_policy) -> factory.
POLICIES: dict[str, Callable[[], EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()
