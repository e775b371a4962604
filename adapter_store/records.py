"""Per-adapter records for the API and the metrics: what `info()` / `list()` return."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from loramux.adapter_store.registry import AdapterEntry


class AdapterStatus(enum.StrEnum):
    REGISTERED = "registered"  # known, on disk only
    LOADING = "loading"  # queued or being read / written
    CPU = "cpu"  # in the CPU tier, not on the device
    DEVICE = "device"  # on the device, ready to pin
    FAILED = "failed"  # registering or loading failed; `error` says why


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    version: int
    status: AdapterStatus
    tier: str  # highest tier holding the current version: "device", "cpu" or "disk"
    rank: int | None  # max rank over modules (None when the config could not be read)
    target_modules: tuple[str, ...]  # adapted leaf names: q_proj, ...
    num_bytes: int | None  # weights in the serving dtype
    disk_bytes: int | None
    pinned: bool  # permanently (--pin or the API)
    num_leases: int  # running requests using the current version
    source: str  # "directory" (an adapter dir), "upload" or "merge" (derived, adapter_store/merged.py)
    error: str | None
    error_type: str | None  # e.g. "AdapterInvalid"
    use_dora: bool = False


def adapter_info(entry: AdapterEntry, in_cpu: bool, pinned: bool, num_leases: int) -> AdapterInfo:
    """The record of one version; the store calls it under its lock, so it is consistent."""
    if entry.error is not None:
        status = AdapterStatus.FAILED
    elif entry.slot is not None:
        status = AdapterStatus.DEVICE
    elif entry.loading:
        status = AdapterStatus.LOADING
    elif in_cpu:
        status = AdapterStatus.CPU  # also while it waits in the CPU tier for a slot
    elif entry.queued:
        status = AdapterStatus.LOADING
    else:
        status = AdapterStatus.REGISTERED
    d = entry.description
    return AdapterInfo(
        adapter_id=entry.adapter_id,
        version=entry.version,
        status=status,
        tier="device" if entry.slot is not None else "cpu" if in_cpu else "disk",
        rank=d.rank if d else None,
        target_modules=d.target_modules if d else (),
        num_bytes=d.num_bytes if d else None,
        disk_bytes=d.disk_bytes if d else None,
        pinned=pinned,
        num_leases=num_leases,
        source="merge" if entry.build is not None else "upload" if entry.owned else "directory",
        error=entry.error,
        error_type=entry.error_type,
        use_dora=bool(d and d.use_dora),
    )
