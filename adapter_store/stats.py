"""Figures for the metrics: tier sizes, hits and misses, loads, evictions, load latency.

The store counts under its lock and hands out frozen snapshots (`StoreStats`); the metrics
layer turns them into Prometheus series. Each finished load is also reported as a
`LoadEvent` to the store's `on_load` hook, for a latency histogram.

Hits and misses:
    device hit   pin of a resident adapter
    device miss  a load was queued for an adapter that is not on the device
    cpu hit      a load served from the CPU tier
    cpu miss     a load that read the adapter from disk
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoadEvent:
    adapter_id: str
    version: int
    source: str  # "disk", "cpu" or "merge" (built from its sources): where the weights came from
    ok: bool
    load_s: float  # reading (disk only) + writing the slot, excluding any wait
    queued_s: float  # from the load request to the adapter being pinnable (or failing)
    error: str | None = None


@dataclass(frozen=True)
class StoreStats:
    num_registered: int  # adapters known (disk tier), failed ones included
    disk_bytes: int  # their files on disk
    num_cpu: int  # adapters in the CPU tier
    cpu_bytes: int  # their weights; never above cpu_budget_bytes
    cpu_budget_bytes: int
    num_device: int  # slots holding a current adapter version, ready to pin
    num_retired: int  # slots holding a replaced or deleted version until its requests end
    device_bytes: int  # adapter weights in those slots (ready + retired)
    num_slots: int
    num_leased_slots: int  # slots pinned by running requests
    num_loading: int  # adapters queued or being loaded
    num_pinned: int  # permanently pinned adapters
    device_hits: int
    device_misses: int
    cpu_hits: int
    cpu_misses: int
    loads: int  # adapters written to the device
    load_failures: int
    cpu_evictions: int
    device_evictions: int
    load_latency_s: tuple[float, ...]  # LoadEvent.load_s of the newest successful loads


@dataclass
class Counters:
    """The store's running counts (mutated under the store's lock)."""

    latency_samples: int
    device_hits: int = 0
    device_misses: int = 0
    cpu_hits: int = 0
    cpu_misses: int = 0
    loads: int = 0
    load_failures: int = 0
    latencies: deque[float] = field(init=False)

    def __post_init__(self) -> None:
        self.latencies = deque(maxlen=self.latency_samples)
