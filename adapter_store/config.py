"""AdapterStoreConfig: where adapters come from and how much memory each tier may use.

Parsed once at start-up (server/config.py composes it) and frozen. The device tier's size is
not here: it is the model's LoRA buffers (max_slots slots of up to max_rank).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loramux.adapter_store.eviction import POLICIES
from loramux.adapter_store.ids import check_adapter_id


class AdapterStoreConfigError(ValueError):
    """A store setting is out of range or inconsistent."""


@dataclass(frozen=True)
class AdapterStoreConfig:
    # Directories scanned at start: each subfolder is one adapter, its name the id.
    adapter_dirs: tuple[Path, ...] = ()
    # Where uploads are staged, validated and kept (<root>/<id>/<version>); None: no uploads.
    upload_root: Path | None = None
    # Bytes of adapter weights (serving dtype) kept in CPU RAM, LRU by bytes.
    cpu_cache_bytes: int = 4 << 30
    # At most this much CPU-tier memory is faulted in ahead of the loads (beyond the highest
    # block in use; up to 32 adapters of the largest size) while the loader is idle, so a
    # cold load never pays page faults (cpu_arena.py); 0: pages fault in on first use.
    # Memory once faulted in is recycled, never returned.
    cpu_prefault_bytes: int = 512 << 20
    # Cap on one upload's files together (adapter_config.json + adapter_model.safetensors).
    max_upload_bytes: int = 1 << 30
    # Uploads handled at once; one more is answered 429 at once (each may hold up to
    # max_upload_bytes of spooled body and a validation on a worker thread).
    max_concurrent_uploads: int = 2
    # Adapters kept on the device for good ("--pin"); more can be pinned through the API.
    pinned: tuple[str, ...] = ()
    # Eviction policy of both tiers, a name in adapter_store.eviction.POLICIES.
    eviction_policy: str = "lru"
    # A freshly loaded adapter is not evicted before its first pin or this many seconds, so
    # the scheduler can pin it (see scheduler/residency.py).
    fresh_grace_s: float = 5.0
    # A queued load asked for by prefetch is dropped when the prefetch was not repeated for
    # this many seconds: the scheduler repeats it every step while a request still waits for
    # the adapter, so the loader serves what is wanted now (a head-of-line request's adapter)
    # before stale asks (see scheduler/residency.py). Loads for pins for good never expire.
    prefetch_ttl_s: float = 2.0
    # Load latencies kept for stats() (the newest ones); the on_load hook sees every load.
    latency_samples: int = 1024
    # Merged adapters (`merged_adapters`, adapter_store/merged.py): derived adapters kept
    # registered at once, and source adapters one merge may name.
    max_merged_adapters: int = 64
    max_merge_ids: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapter_dirs", _paths(self.adapter_dirs))
        if self.upload_root is not None:
            object.__setattr__(self, "upload_root", Path(self.upload_root))
        object.__setattr__(self, "pinned", _ids(self.pinned))
        _check(self.cpu_cache_bytes >= 0, "cpu_cache_bytes must be >= 0")
        _check(self.cpu_prefault_bytes >= 0, "cpu_prefault_bytes must be >= 0")
        _check(self.max_upload_bytes >= 1, "max_upload_bytes must be >= 1")
        _check(self.max_concurrent_uploads >= 1, "max_concurrent_uploads must be >= 1")
        _check(
            self.eviction_policy in POLICIES,
            f"eviction_policy {self.eviction_policy!r} is not one of {sorted(POLICIES)}",
        )
        _check(
            self.fresh_grace_s >= 0 and not math.isnan(self.fresh_grace_s),
            "fresh_grace_s must be >= 0",
        )
        _check(
            self.prefetch_ttl_s > 0 and not math.isnan(self.prefetch_ttl_s),
            "prefetch_ttl_s must be > 0",
        )
        _check(self.latency_samples >= 0, "latency_samples must be >= 0")
        _check(self.max_merged_adapters >= 1, "max_merged_adapters must be >= 1")
        _check(self.max_merge_ids >= 1, "max_merge_ids must be >= 1")


def _paths(paths: Iterable[str | Path] | str | Path) -> tuple[Path, ...]:
    if isinstance(paths, (str, Path)):
        paths = (paths,)
    return tuple(Path(p) for p in paths)


def _ids(ids: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(ids, str):
        ids = (ids,)
    ids = tuple(dict.fromkeys(ids))
    for adapter_id in ids:
        check_adapter_id(adapter_id)  # InvalidAdapterId is a typed error of its own
    return ids


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise AdapterStoreConfigError(message)
