"""How the scheduler sees adapter residency on the device (the adapter store implements it).

The scheduler never loads adapters itself: it asks for a load when a request is queued
(`prefetch`), admits a request only once its adapter is complete on the device
(`is_resident`), and holds a lease on the device slot while the request runs (`pin` on
admission, `unpin` when it finishes; a preempted request keeps its lease while it waits to
resume). A pinned slot is never evicted or overwritten, so a replaced or deleted adapter
keeps serving its running and preempted requests from the old slot.

Contract for implementations:
- `prefetch` is a hint, idempotent, and returns at once. The store loads when it can (while
  every slot is pinned it has to wait). The scheduler repeats the hint every step in which
  it skips a request for a non-resident adapter, so a store may drop hints it cannot serve.
- A freshly loaded adapter should stay until it has been pinned once (or a short grace
  period passed); a store that evicts it first can thrash when every slot is wanted, and
  the scheduler's starvation bound assumes it does not.
- `pin` returns the slot of the adapter's current version and adds one reference, or None
  when the adapter is not resident (any more). Each pin is matched by exactly one `unpin`.
- `load_error` is sticky: once an adapter is unknown, failed to load or was deleted, it
  keeps returning the message (until the adapter is registered again).
- `slot_version` is read-only: the version number of the adapter in a slot the caller
  holds a pin on. Versions of one id never repeat (also across deletes), so the prefix
  cache seeds its block hashes with (adapter_id, version) and never serves a replaced or
  deleted adapter's KV blocks to a newer version.
Base requests (adapter_id None) never call any of these; their slot is BASE_SLOT.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class AdapterResidency(Protocol):
    @property
    def num_slots(self) -> int: ...  # device adapter slots

    def is_resident(self, adapter_id: str) -> bool: ...  # complete on the device, ready to pin

    def prefetch(self, adapter_id: str) -> None: ...  # ask for a load; returns at once

    def pin(self, adapter_id: str) -> int | None: ...  # lease the current slot (refcount +1)

    def unpin(self, slot: int) -> None: ...  # refcount -1

    def load_error(self, adapter_id: str) -> str | None: ...  # failed / unknown / deleted

    def slot_version(self, slot: int) -> int: ...  # version held by a slot the caller pinned
