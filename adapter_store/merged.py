"""Merged adapters in the store: one derived adapter per distinct merge spec.

`MergedAdapters.resolve(spec)` returns the id of the derived adapter for a spec and the
current versions of its sources: `merge-<hash>` of the canonical spec plus those versions,
so a replaced source gives a new derived adapter and never serves the old merge. The
first resolve checks the sources' configs (ranks per projection, from the config alone)
and registers the derived adapter; its weights are built by the store's loader thread
when a request needs it (merge.merge_adapters over the sources read in float32), then
cached in the CPU tier and a device slot like any adapter: counted in bytes, evicted by
the store's policy, rebuilt (identically: DARE is seeded by the spec) when needed again.

At most `max_entries` derived adapters stay registered: the least recently resolved
one that no running request holds, and that was not resolved in the last `recent_s`
seconds (a request resolved then may still wait in the queue), is deleted to make room;
when there is none, the new merge is refused (MergeCapacity).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loramux.adapter_store.errors import AdapterError, AdapterNotFound
from loramux.adapter_store.format import CONFIG_NAME, LoraAdapter, load_adapter, read_adapter_config, resolve_targets
from loramux.adapter_store.ids import DERIVED_PREFIX
from loramux.adapter_store.merge import MergeSpec, MergeSpecInvalid, check_compatible, check_mergeable, merge_adapters
from loramux.adapter_store.registry import AdapterDescription
from loramux.adapter_store.records import AdapterStatus

if TYPE_CHECKING:
    from loramux.adapter_store.store import AdapterStore

DIGEST_CHARS = 32  # of the sha256 hex digest in a derived id: 128 bits
RECENT_S = 30.0  # a merge resolved this recently is kept: its request may still be queued


class MergeSourceNotFound(MergeSpecInvalid):
    """A merge names an adapter that is not registered."""


class MergeCapacity(Exception):
    """Every derived-adapter place is held by a running request: retry later."""


class MergedAdapters:
    def __init__(self, store: AdapterStore, max_entries: int, recent_s: float = RECENT_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._max_entries = max_entries
        self._recent_s = recent_s
        self._clock = clock
        self._lock = threading.Lock()  # guards _ids; never held across I/O or the store's calls
        self._ids: OrderedDict[str, float] = OrderedDict()  # derived id -> last resolve time, LRU first
        self.num_builds = 0  # derived adapters built (weights computed), for tests and stats

    def derived_id(self, spec: MergeSpec) -> tuple[str, list[tuple[int, Path]]]:
        """(derived id, the sources' (version, directory)). Raises MergeSpecInvalid naming
        `ids` for a source that is unknown or failed."""
        sources = []
        for adapter_id in spec.ids:
            if adapter_id.startswith(DERIVED_PREFIX):
                raise MergeSpecInvalid("ids", f"{adapter_id!r} is a merged adapter; merge its sources instead")
            try:
                sources.append(self._store.source_of(adapter_id))
            except AdapterNotFound:
                raise MergeSourceNotFound("ids", f"adapter {adapter_id!r} does not exist") from None
            except AdapterError as e:
                raise MergeSpecInvalid("ids", f"adapter {adapter_id!r} cannot be merged: {e.reason}") from None
        digest = spec.digest([version for version, _ in sources])
        return DERIVED_PREFIX + digest[:DIGEST_CHARS], sources

    def resolve(self, spec: MergeSpec) -> str:
        """The derived adapter's id, registered if new. Blocking on a new spec (reads the
        sources' configs): call it off the event loop. Raises MergeSpecInvalid, MergeCapacity."""
        adapter_id, sources = self.derived_id(spec)
        with self._lock:
            known = adapter_id in self._ids
            if known:
                self._ids[adapter_id] = self._clock()
                self._ids.move_to_end(adapter_id)
        if known and self._registered(adapter_id):
            return adapter_id
        description = self._describe(spec, sources)
        self._make_room(adapter_id)
        self._store.register_derived(adapter_id, description, self._builder(adapter_id, spec, sources))
        with self._lock:
            self._ids[adapter_id] = self._clock()
            self._ids.move_to_end(adapter_id)
        return adapter_id

    def _registered(self, adapter_id: str) -> bool:
        try:
            return self._store.info(adapter_id).status is not AdapterStatus.FAILED
        except AdapterNotFound:
            return False  # deleted through the API: register it again

    def _describe(self, spec: MergeSpec, sources: list[tuple[int, Path]]) -> AdapterDescription:
        """Rank and size of the merge from the sources' configs; checks ranks agree."""
        store = self._store
        ranks = []
        for adapter_id, (_, directory) in zip(spec.ids, sources):
            try:
                config = read_adapter_config(adapter_id, directory)
                targets = resolve_targets(adapter_id, config, store.spec, directory / CONFIG_NAME)
            except AdapterError as e:
                raise MergeSpecInvalid("ids", f"adapter {adapter_id!r} cannot be merged: {e.reason}") from None
            check_mergeable(adapter_id, list(targets), bool(getattr(config, "use_dora", False)))
            ranks.append({key: target.rank for key, target in targets.items()})
        union = check_compatible(spec.ids, ranks)
        element = torch.empty((), dtype=store.dtype).element_size()
        shapes = store.spec.module_shapes
        num_bytes = sum(rank * sum(shapes[module]) * element for (_, module), rank in union.items())
        adapted = {module for _, module in union}
        names = tuple(m for m in shapes if m in adapted)
        return AdapterDescription(max(union.values()), names, num_bytes, 0)

    def _builder(self, adapter_id: str, spec: MergeSpec, sources: list[tuple[int, Path]]):
        store = self._store

        def build(dtype: torch.dtype) -> LoraAdapter:
            # Sources in float32 from disk, not the CPU tier's serving-dtype copies: merging
            # rounded bf16 factors would lose what the merge is for.
            loaded = [load_adapter(source_id, directory, store.spec, store.max_rank, torch.float32)
                      for source_id, (_, directory) in zip(spec.ids, sources)]
            self.num_builds += 1
            return merge_adapters(adapter_id, spec, loaded, dtype)

        return build

    def _make_room(self, new_id: str) -> None:
        """Delete least recently resolved derived adapters until one more fits."""
        while True:
            with self._lock:
                if len(self._ids) < self._max_entries or new_id in self._ids:
                    return
                horizon = self._clock() - self._recent_s
                candidates = [i for i, used in self._ids.items() if used < horizon]
            victim = next((i for i in candidates if self._idle(i)), None)
            if victim is None:
                raise MergeCapacity(
                    f"the {self._max_entries} merged adapters this server keeps are all in use; retry later"
                )
            with self._lock:
                self._ids.pop(victim, None)
            try:
                self._store.delete(victim)
            except AdapterNotFound:
                pass

    def _idle(self, adapter_id: str) -> bool:
        """No running request holds it and no load is under way (a queued request may still
        name it: it then fails as for a deleted adapter, which the limit makes rare)."""
        try:
            info = self._store.info(adapter_id)
        except AdapterNotFound:
            return True
        return info.num_leases == 0 and info.status is not AdapterStatus.LOADING
