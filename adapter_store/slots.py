"""The device tier's bookkeeping: which adapter each slot holds, its leases, what may go.

Pure Python (the weights are written by adapter_store.device_slots). A slot is

    FREE     nothing in it; the loader may take it
    LOADING  reserved by the loader, being written; nobody can pin it
    READY    holds an adapter version (`owner`), pinnable while the owner is current

Invariants (checked by the tests):
- a slot with leases (refs > 0) is READY and never reserved, so the loader never writes
  into a slot a running request reads;
- a protected (permanently pinned) slot, or a fresh one (published, not pinned yet, and
  its grace period not over) is never reserved either;
- a retired slot (its adapter was replaced or deleted) keeps serving its leases and is
  freed by the last unpin.
Not thread-safe on its own: the store calls it under its lock.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from loramux.adapter_store.eviction import EvictionPolicy

O = TypeVar("O")  # noqa: E741 - the owner type, opaque here (the store's registry entry)


class SlotState(enum.Enum):
    FREE = "free"
    LOADING = "loading"
    READY = "ready"


@dataclass(slots=True)
class _Slot(Generic[O]):
    state: SlotState = SlotState.FREE
    owner: O | None = None  # the adapter version held; None while FREE or LOADING
    refs: int = 0  # leases of running requests
    retired: bool = False  # owner replaced or deleted: freed by the last unpin
    protected: bool = False  # owner permanently pinned: never evicted
    fresh_until: float | None = None  # not evicted before this (unless pinned since)
    num_bytes: int = 0  # the owner's weight bytes (what it would take on its own)


class SlotTable(Generic[O]):
    def __init__(self, num_slots: int, policy: EvictionPolicy[int]) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._slots: list[_Slot] = [_Slot() for _ in range(num_slots)]
        self._free = set(range(num_slots))
        self._policy = policy  # READY slots only
        self.num_evictions = 0

    # ---------------------------------------------------------------- engine thread

    def pin(self, slot: int) -> None:
        s = self._slots[slot]
        assert s.state is SlotState.READY and not s.retired, (slot, s)
        s.refs += 1
        s.fresh_until = None  # pinned once: plain LRU from now on
        self._policy.record_use(slot)

    def unpin(self, slot: int) -> O | None:
        """Drop one lease. Returns the owner when this freed a retired slot, else None."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"unpin of slot {slot}: there are {self.num_slots} slots")
        s = self._slots[slot]
        if s.refs <= 0:
            raise ValueError(f"unpin of slot {slot}, which has no pin")
        s.refs -= 1
        if s.refs == 0 and s.retired:
            owner = s.owner
            self._free_slot(slot)
            return owner
        self._policy.record_use(slot)
        return None

    # ---------------------------------------------------------------- loader thread

    def reserve(self, now: float) -> tuple[int, O | None] | None:
        """Take a free slot, else evict the policy's first evictable one; mark it LOADING.

        Returns (slot, evicted owner or None), or None when every slot is leased,
        protected, fresh or loading.
        """
        evicted = None
        if self._free:
            slot = min(self._free)
            self._free.discard(slot)
        else:
            slot = next((i for i in self._policy.victims() if self.is_evictable(i, now)), None)
            if slot is None:
                return None
            evicted = self._slots[slot].owner
            self._policy.forget(slot)
            self.num_evictions += 1
        self._slots[slot] = _Slot(state=SlotState.LOADING)
        return slot, evicted

    def publish(
        self, slot: int, owner: O, num_bytes: int, fresh_until: float | None, protected: bool
    ) -> None:
        """The write into a LOADING slot is complete: it is READY and pinnable now."""
        s = self._slots[slot]
        assert s.state is SlotState.LOADING, (slot, s)
        self._slots[slot] = _Slot(
            state=SlotState.READY,
            owner=owner,
            protected=protected,
            fresh_until=fresh_until,
            num_bytes=num_bytes,
        )
        self._policy.record_use(slot)

    def release(self, slot: int) -> None:
        """Give back a LOADING slot whose load was abandoned."""
        assert self._slots[slot].state is SlotState.LOADING, (slot, self._slots[slot])
        self._free_slot(slot)

    # ---------------------------------------------------------------- any thread

    def retire(self, slot: int) -> bool:
        """Its owner was replaced or deleted: free now if unleased (True), else at last unpin."""
        s = self._slots[slot]
        assert s.state is SlotState.READY, (slot, s)
        if s.refs == 0:
            self._free_slot(slot)
            return True
        s.retired = True
        s.protected = False
        self._policy.forget(slot)  # leased: not a victim now, and freed rather than evicted
        return False

    def set_protected(self, slot: int, protected: bool) -> None:
        self._slots[slot].protected = protected

    def is_evictable(self, slot: int, now: float) -> bool:
        s = self._slots[slot]
        return (
            s.state is SlotState.READY
            and s.refs == 0
            and not s.retired
            and not s.protected
            and (s.fresh_until is None or now >= s.fresh_until)
        )

    def next_fresh_expiry(self) -> float | None:
        """When the earliest unpinned fresh slot becomes evictable (None: no such slot)."""
        times = [
            s.fresh_until
            for s in self._slots
            if s.state is SlotState.READY and s.fresh_until is not None and not s.protected
        ]
        return min(times, default=None)

    def owner(self, slot: int) -> O | None:
        return self._slots[slot].owner

    def refs(self, slot: int) -> int:
        return self._slots[slot].refs

    def state(self, slot: int) -> SlotState:
        return self._slots[slot].state

    def is_retired(self, slot: int) -> bool:
        return self._slots[slot].retired

    def is_protected(self, slot: int) -> bool:
        return self._slots[slot].protected

    def ready(self) -> Iterator[tuple[int, O, int]]:
        """(slot, owner, num_bytes) of every READY slot, retired ones included."""
        for i, s in enumerate(self._slots):
            if s.state is SlotState.READY:
                yield i, s.owner, s.num_bytes  # type: ignore[misc]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_leased(self) -> int:
        return sum(1 for s in self._slots if s.refs)

    def _free_slot(self, slot: int) -> None:
        self._slots[slot] = _Slot()
        self._free.add(slot)
        self._policy.forget(slot)
