"""AdapterStore: adapters paged between disk, CPU RAM and the device's LoRA slots.

    disk    every registered adapter (config read, weights not)      registry.py
    CPU     validated weights in the serving dtype, LRU by bytes       cpu_cache.py
            (memory: one arena, faulted in ahead, recycled)            cpu_arena.py
    device  the model's stacked LoRA buffers, `num_slots` slots         slots.py

The store implements the scheduler's `AdapterResidency` (scheduler/residency.py): the
engine thread calls `is_resident` / `pin` / `unpin` every step (O(1) under one lock, no
I/O), `prefetch` when a request is queued, and `load_error` to fail requests whose adapter
is unknown, broken or deleted. The HTTP thread registers, uploads, deletes, (un)pins for
good and lists. One loader thread reads adapters (disk -> CPU tier) and writes them into
free or evictable slots (CPU -> device), one at a time in request order; an adapter
becomes resident only once its slot is completely written. A load asked for by prefetch
is dropped once the ask has not been repeated for `prefetch_ttl_s` (the scheduler repeats
it every step while a request waits for the adapter), so asks nobody repeats any more, say
for requests queued behind a starving one, never delay the load that request needs now.

Invariants:
- a slot leased by a running request (pinned) is never evicted or written;
- a permanently pinned adapter's slot is never evicted; at most num_slots - 1 adapters
  are pinned for good, so every other adapter can still get a slot;
- a freshly loaded adapter is not evicted before its first pin or `fresh_grace_s`;
- replacing or deleting an adapter makes its id non-resident at once (new pins wait for
  the new version, or get load_error); the old slot keeps serving its leases and is freed
  by the last unpin; the old CPU copy is dropped at once;
- the CPU tier never holds more than cpu_cache_bytes (the one adapter the loader has in
  hand comes on top).

Locks: `_install_lock` serializes registrations, uploads' commits and deletes (version
numbers, renames); `_lock` guards all state and is only ever taken after it, never held
across I/O or a slot write.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from loramux.adapter_store.config import AdapterStoreConfig, AdapterStoreConfigError
from loramux.adapter_store.cpu_arena import ALIGN, ArenaStats, CpuArena
from loramux.adapter_store.cpu_cache import CpuCache
from loramux.adapter_store.device_slots import check_buffers
from loramux.adapter_store.errors import (
    AdapterError,
    AdapterNotFound,
    InvalidAdapterId,
    PinLimitExceeded,
    UploadsDisabled,
)
from loramux.adapter_store.eviction import make_policy
from loramux.adapter_store.format import BaseModelSpec, LoraAdapter, load_adapter, warm_parsed_keys
from loramux.adapter_store.ids import DERIVED_PREFIX, check_adapter_id, check_user_adapter_id
from loramux.adapter_store.loader import LoaderThread, LoadFn, SlotWriter
from loramux.adapter_store.merged import MergedAdapters
from loramux.adapter_store.records import AdapterInfo, AdapterStatus, adapter_info  # noqa: F401
from loramux.adapter_store.registry import (
    AdapterDescription,
    AdapterEntry,
    Describer,
    Registry,
    scan_adapter_dir,
)
from loramux.adapter_store.slots import SlotTable
from loramux.adapter_store.stats import Counters, LoadEvent, StoreStats
from loramux.adapter_store.uploads import UploadArea
from loramux.kernels.buffers import LoraModuleBuffers

log = logging.getLogger(__name__)

_LIST_CHUNK = 256  # list() takes the lock per this many adapters, not for all of them
PREFAULT_LOADS = 32  # adapters of the largest size whose memory is faulted in ahead


@dataclass(frozen=True)
class _InHand:
    """An adapter the loader has read for the queue's head, kept until it gets a slot."""

    entry: AdapterEntry
    adapter: LoraAdapter
    source: str  # "disk", "cpu" or "merge" (built from its sources)
    read_s: float  # seconds the disk read took (0 from the CPU tier)


class AdapterStore:
    """See the module docstring. Use as a context manager, or call start() and close()."""

    def __init__(
        self,
        config: AdapterStoreConfig,
        spec: BaseModelSpec,
        buffers: Mapping[tuple[int, str], LoraModuleBuffers],  # (layer, module) -> buffers
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        # Injectable: tests slow or fail loads with it. None: format.load_adapter into the
        # CPU tier's arena (an injected one allocates its own memory).
        load_fn: LoadFn | None = None,
        on_load: Callable[[LoadEvent], None] | None = None,  # each load, on the loader thread
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_slots, self.max_rank = check_buffers(buffers, spec, dtype, self.device)
        self._buffers = buffers
        self._on_load = on_load
        self._clock = clock

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # the loader sleeps on it
        self._install_lock = threading.Lock()
        self._registry = Registry()
        self._describer = Describer(spec, self.max_rank, dtype)
        # The arena holds the CPU tier plus the one adapter the loader has in hand; it is
        # faulted in ahead for a burst of cold loads of the largest adapter, at most
        # cpu_prefault_bytes (a store of small adapters faults in little).
        max_adapter = _max_adapter_bytes(spec, self.max_rank, dtype)
        self._arena: CpuArena | None = None
        if config.cpu_cache_bytes > 0:
            try:
                self._arena = CpuArena(
                    config.cpu_cache_bytes + max_adapter,
                    min(config.cpu_prefault_bytes, PREFAULT_LOADS * max_adapter),
                )
            except OSError as e:  # no address space or commit for the mapping (strict overcommit)
                log.warning("CPU tier without an arena (adapters in fresh memory): %s", e)
        self._cpu = CpuCache(config.cpu_cache_bytes, make_policy(config.eviction_policy), self._arena)
        self._load_fn: LoadFn = load_fn or partial(load_adapter, alloc=self._allocate)
        warm_parsed_keys(spec)  # ~5 ms here instead of in the first cold load
        self._slots: SlotTable[AdapterEntry] = SlotTable(
            self.max_slots, make_policy(config.eviction_policy)
        )
        self._permanent: set[str] = set()  # ids pinned for good (kept across versions)
        self._queue: deque[AdapterEntry] = deque()  # load requests, oldest first
        self._held: _InHand | None = None  # the adapter the loader has read, until placed
        self._wakeups = 0  # bumped by every _wake(), so the loader never sleeps through one
        self._counters = Counters(config.latency_samples)
        self._uploads = (
            UploadArea(config.upload_root, config.max_upload_bytes)
            if config.upload_root is not None
            else None
        )
        self._writer = SlotWriter(buffers, self.device)
        self._loader: LoaderThread | None = None
        self.merges = MergedAdapters(self, config.max_merged_adapters, clock=clock)  # derived adapters by spec
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def start(self, run_loader: bool = True) -> AdapterStore:
        """Register the adapter dirs and committed uploads, pin --pin ids, start the loader.

        run_loader=False leaves loads to drain() (tests and tools). Raises
        AdapterStoreConfigError for a missing adapter dir, AdapterNotFound for a --pin id
        that is not registered, PinLimitExceeded for too many of them.
        """
        if self._started:
            raise RuntimeError("the adapter store is already started")
        self._started = True
        self._scan()
        for adapter_id in self.config.pinned:
            self.pin_permanent(adapter_id)
        if run_loader:
            self._loader = LoaderThread(
                self._loader_step, self._cond, lambda: self._wakeups, self._idle_timeout
            )
            self._loader.start()
        return self

    def close(self) -> None:
        """Stop the loader thread (after the unit of work under way) and join it."""
        if self._closed:
            return
        self._closed = True
        if self._loader is not None:
            self._loader.stop()

    def __enter__(self) -> AdapterStore:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _scan(self) -> int:
        """Register every adapter of the adapter dirs and the upload root; returns how many.

        Reads configs and file sizes only. Adapters with a bad config are registered as
        failed; folders whose names are not valid ids are skipped with a warning.
        """
        count = 0
        with self._install_lock:
            for root in self.config.adapter_dirs:
                try:
                    found = list(scan_adapter_dir(root))
                except OSError as e:
                    raise AdapterStoreConfigError(f"cannot read adapter dir {root}: {e}") from e
                for adapter_id, directory in found:
                    if self._registry.get(adapter_id) is not None:
                        log.warning("adapter %r in %s replaces an earlier one", adapter_id, root)
                    self._install(adapter_id, directory, owned=False)
                    count += 1
            if self._uploads is not None:
                self._uploads.prepare()
                for adapter_id, version, directory in self._uploads.scan():
                    self._install(adapter_id, directory, owned=True, version=version)
                    count += 1
        return count

    # ------------------------------------------------------------------ AdapterResidency

    @property
    def num_slots(self) -> int:
        return self.max_slots

    def is_resident(self, adapter_id: str) -> bool:
        with self._lock:
            entry = self._registry.get(adapter_id)
            return entry is not None and entry.slot is not None

    def prefetch(self, adapter_id: str) -> None:
        """Queue a load of the current version unless it is resident, queued or failed; a
        queued one's ask is renewed (it expires after config.prefetch_ttl_s)."""
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is not None:
                entry.hinted_at = self._clock()
                self._enqueue(entry)

    def pin(self, adapter_id: str) -> int | None:
        """Lease the current version's slot (+1 reference), or None when not resident."""
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is None or entry.slot is None:
                return None
            self._slots.pin(entry.slot)
            self._counters.device_hits += 1
            return entry.slot

    def unpin(self, slot: int) -> None:
        """Drop one lease; the last one frees a replaced or deleted version's slot."""
        with self._lock:
            self._slots.unpin(slot)
            if self._slots.refs(slot) == 0:
                self._wake()  # the slot is free or evictable now: a load may be waiting

    def slot_version(self, slot: int) -> int:
        """The version of the adapter in a slot the caller has pinned (prefix-cache key)."""
        with self._lock:
            owner = self._slots.owner(slot)
            if owner is None:
                raise ValueError(f"slot {slot} holds no adapter")
            return owner.version

    def load_error(self, adapter_id: str) -> str | None:
        """Why requests naming this adapter cannot run (sticky), or None."""
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is not None:
                return entry.error
        try:
            check_adapter_id(adapter_id)
        except InvalidAdapterId as e:
            return str(e)
        return f"unknown adapter {adapter_id!r}"

    # ------------------------------------------------------------------ registry API

    def register_directory(self, adapter_id: str, directory: str | Path) -> AdapterInfo:
        """Register (or replace with a new version) an adapter read in place from `directory`.

        Checks the config and file sizes only (the weights are checked when it loads) and
        raises their typed error, keeping the current version. The store never deletes
        this directory.
        """
        check_user_adapter_id(adapter_id)
        directory = Path(directory)
        description, error = self._describer.describe_or_error(adapter_id, directory)
        if error is not None:
            raise error
        with self._install_lock:
            entry = self._install(adapter_id, directory, owned=False, description=description)
        return self._info_locked(entry)

    def upload(self, adapter_id: str, config_json: bytes, weights: bytes) -> AdapterInfo:
        """Add (or replace) an adapter from the bytes of its two files.

        The files are written under the upload root's staging area, validated in full
        (format.load_adapter), then renamed into place; nothing of a failed upload stays.
        Blocking (file I/O and validation): call it from a worker thread, not the event
        loop. Raises InvalidAdapterId, UploadsDisabled, UploadTooLarge, or the typed error
        of the invalid adapter (AdapterInvalid, AdapterUnsupported, AdapterTooLarge, ...).
        """
        check_user_adapter_id(adapter_id)
        area = self._upload_area(adapter_id)
        staging = area.stage_files(adapter_id, config_json, weights)
        return self._commit_upload(adapter_id, area, staging)

    def upload_directory(self, adapter_id: str, directory: str | Path) -> AdapterInfo:
        """Like `upload`, from an existing directory (its two files are copied, then validated).

        The caller must trust `directory`: it is a path on this machine, not an id.
        """
        check_user_adapter_id(adapter_id)
        area = self._upload_area(adapter_id)
        staging = area.stage_directory(adapter_id, Path(directory))
        return self._commit_upload(adapter_id, area, staging)

    def register_derived(
        self, adapter_id: str, description: AdapterDescription, build: Callable[[torch.dtype], LoraAdapter]
    ) -> AdapterInfo:
        """Register an adapter computed from others (a merge, adapter_store/merged.py) unless
        its id is registered already. `build(dtype)` makes its weights on the loader thread
        when it is needed; like any adapter it is then cached in the CPU tier and a slot,
        evicted from both by policy, and rebuilt when needed again. Ids start with
        DERIVED_PREFIX, which users cannot register."""
        check_adapter_id(adapter_id)
        if not adapter_id.startswith(DERIVED_PREFIX):
            raise ValueError(f"derived adapter ids start with {DERIVED_PREFIX!r}")
        with self._install_lock:
            with self._lock:
                entry = self._registry.get(adapter_id)
                if entry is None or entry.error is not None:
                    version = self._registry.next_version(adapter_id)
                    entry = AdapterEntry(adapter_id, version, None, False, description, build=build)
                    old = self._registry.install(entry)
                    if old is not None:
                        self._retire(old)
                return self._info(entry)

    def source_of(self, adapter_id: str) -> tuple[int, Path]:
        """(version, directory) of a registered, not failed, file-backed adapter: what a
        derived adapter reads. Raises AdapterNotFound, or AdapterError for a failed one."""
        check_adapter_id(adapter_id)
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is None or entry.directory is None:
                raise AdapterNotFound(adapter_id, None, "no such adapter")
            if entry.error is not None:
                raise AdapterError(adapter_id, None, f"failed to load: {entry.error}")
            return entry.version, entry.directory

    def delete(self, adapter_id: str) -> None:
        """Forget an adapter: new requests get load_error at once; its slot is freed by the
        last running request's unpin, its CPU copy and uploaded files at once."""
        check_adapter_id(adapter_id)
        with self._install_lock:
            with self._lock:
                entry = self._registry.remove(adapter_id)
                if entry is None:
                    raise AdapterNotFound(adapter_id, None, "no such adapter")
                self._permanent.discard(adapter_id)
                self._retire(entry)
            self._remove_files(entry)

    def pin_permanent(self, adapter_id: str) -> None:
        """Keep an adapter on the device for good (also across replacements); loads it now."""
        check_adapter_id(adapter_id)
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is None:
                raise AdapterNotFound(adapter_id, None, "no such adapter")
            if adapter_id in self._permanent:
                return
            if len(self._permanent) + 1 >= self.num_slots:
                raise PinLimitExceeded(
                    adapter_id,
                    None,
                    f"{len(self._permanent)} adapters are pinned already; pinning one more "
                    f"would leave no device slot (of {self.num_slots}) for the others",
                )
            self._permanent.add(adapter_id)
            if entry.slot is not None:
                self._slots.set_protected(entry.slot, True)
            else:
                self._enqueue(entry)

    def unpin_permanent(self, adapter_id: str) -> None:
        """Undo pin_permanent: the adapter is evictable again once no request uses it."""
        check_adapter_id(adapter_id)
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is None:
                raise AdapterNotFound(adapter_id, None, "no such adapter")
            self._permanent.discard(adapter_id)
            if entry.slot is not None:
                self._slots.set_protected(entry.slot, False)
                self._wake()

    def info(self, adapter_id: str) -> AdapterInfo:
        check_adapter_id(adapter_id)
        with self._lock:
            entry = self._registry.get(adapter_id)
            if entry is None:
                raise AdapterNotFound(adapter_id, None, "no such adapter")
            return self._info(entry)

    def list(self) -> list[AdapterInfo]:
        """Every registered adapter, by id. Takes the lock in chunks, so a list of thousands
        never stalls the engine thread's pins for long."""
        with self._lock:
            entries = self._registry.entries()
        entries.sort(key=lambda e: e.adapter_id)
        infos = []
        for i in range(0, len(entries), _LIST_CHUNK):
            with self._lock:
                infos.extend(
                    self._info(e)
                    for e in entries[i : i + _LIST_CHUNK]
                    if self._registry.get(e.adapter_id) is e  # not deleted or replaced since
                )
        return infos

    def stats(self) -> StoreStats:
        with self._lock:
            c = self._counters
            ready = list(self._slots.ready())
            num_retired = sum(1 for slot, _, _ in ready if self._slots.is_retired(slot))
            return StoreStats(
                num_registered=len(self._registry),
                disk_bytes=self._registry.disk_bytes,
                num_cpu=len(self._cpu),
                cpu_bytes=self._cpu.num_bytes,
                cpu_budget_bytes=self._cpu.budget_bytes,
                num_device=len(ready) - num_retired,
                num_retired=num_retired,
                device_bytes=sum(num_bytes for _, _, num_bytes in ready),
                num_slots=self.num_slots,
                num_leased_slots=self._slots.num_leased,
                num_loading=sum(1 for e in self._queue if self._is_current(e)),
                num_pinned=len(self._permanent),
                device_hits=c.device_hits,
                device_misses=c.device_misses,
                cpu_hits=c.cpu_hits,
                cpu_misses=c.cpu_misses,
                loads=c.loads,
                load_failures=c.load_failures,
                cpu_evictions=self._cpu.num_evictions,
                device_evictions=self._slots.num_evictions,
                load_latency_s=tuple(c.latencies),
            )

    def drain(self) -> int:
        """Run queued loads in this thread until none can progress; returns the steps run.

        Only for a store started with run_loader=False (tests, tools).
        """
        if self._loader is not None:
            raise RuntimeError("drain() with a loader thread running")
        steps = 0
        while self._step():
            steps += 1
        return steps

    # ------------------------------------------------------------------ installing

    def _upload_area(self, adapter_id: str) -> UploadArea:
        if self._uploads is None:
            raise UploadsDisabled(adapter_id, None, "uploads are disabled (no upload_root)")
        return self._uploads

    def _commit_upload(self, adapter_id: str, area: UploadArea, staging: Path) -> AdapterInfo:
        try:
            area.check_case_unique(adapter_id)  # early: before the validation's cost
            # Full validation before the upload becomes visible; the weights it read (in
            # the serving dtype) go to the CPU tier, so the first use skips the disk.
            adapter = load_adapter(
                adapter_id, staging, self.spec, self.max_rank, self.dtype, alloc=self._allocate
            )
            description, error = self._describer.describe_or_error(adapter_id, staging)
            if error is not None:
                raise error
        except AdapterError as e:
            area.remove_staging(staging)
            if e.path is not None and Path(e.path).parent == staging:
                e.path = Path(e.path).name  # the user's file, not our staging path
            raise
        except BaseException:
            area.remove_staging(staging)
            raise
        with self._install_lock:
            version = self._registry.next_version(adapter_id)
            try:
                directory = area.commit(staging, adapter_id, version)
            except BaseException:
                area.remove_staging(staging)
                raise
            entry = self._install(
                adapter_id,
                directory,
                owned=True,
                version=version,
                description=description,
                adapter=adapter,
            )
        return self._info_locked(entry)

    def _install(
        self,
        adapter_id: str,
        directory: Path,
        owned: bool,
        version: int | None = None,
        description: AdapterDescription | None = None,
        adapter: LoraAdapter | None = None,
    ) -> AdapterEntry:
        """Make a new version current (caller holds _install_lock); retire the old one."""
        error = None
        if description is None:
            description, error = self._describer.describe_or_error(adapter_id, directory)
            if error is not None:
                log.warning("adapter %r cannot be served: %s", adapter_id, error)
        version = max(version or 0, self._registry.next_version(adapter_id))
        entry = AdapterEntry(adapter_id, version, directory, owned, description)
        if error is not None:
            entry.fail(error)
        with self._lock:
            old = self._registry.install(entry)
            was_wanted = False
            if old is not None:
                was_wanted = old.slot is not None or old.queued
                self._retire(old)
            if adapter is not None:
                self._cpu.put(entry.key, adapter)
            if was_wanted or adapter_id in self._permanent:
                self._enqueue(entry)  # hot replacement: load the new version right away
        if old is not None and old.directory != directory:
            self._remove_files(old)
        return entry

    def _remove_files(self, entry: AdapterEntry) -> None:
        """An uploaded version's files go with it (its weights are in a slot if in use)."""
        if entry.owned and self._uploads is not None:
            self._uploads.remove_version(entry.directory)

    def _retire(self, entry: AdapterEntry) -> None:
        """Under _lock: `entry` is no longer current. Its slot serves its leases only."""
        if entry.slot is not None:
            self._slots.retire(entry.slot)
            entry.slot = None
        self._cpu.discard(entry.key)
        self._wake()  # the loader may be waiting on this entry, or for its slot

    # ------------------------------------------------------------------ loading

    def _enqueue(self, entry: AdapterEntry) -> None:
        """Under _lock: ask the loader for `entry` unless it is resident, queued or failed."""
        if entry.error is not None or entry.slot is not None or entry.queued:
            return
        entry.queued = True
        entry.queued_at = self._clock()
        self._queue.append(entry)
        self._counters.device_misses += 1
        self._wake()

    def _wake(self) -> None:
        self._wakeups += 1
        self._cond.notify_all()

    def _idle_timeout(self) -> float | None:
        """Under _lock: how long the loader may sleep: when a load is waiting for a slot,
        until a fresh slot becomes evictable or that load's ask expires, else until woken."""
        if not self._queue:
            return None
        times = [self._slots.next_fresh_expiry(), self._ask_expiry(self._queue[0])]
        times = [t for t in times if t is not None]
        return max(0.001, min(times) - self._clock()) if times else None

    def _ask_expiry(self, entry: AdapterEntry) -> float | None:
        """Under _lock: when `entry`'s queued load expires, or None (it never does)."""
        if entry.hinted_at is None or entry.adapter_id in self._permanent:
            return None
        return entry.hinted_at + self.config.prefetch_ttl_s

    def _is_current(self, entry: AdapterEntry) -> bool:
        return self._registry.get(entry.adapter_id) is entry and entry.error is None

    def _next_job(self) -> AdapterEntry | None:
        """Under _lock: the oldest queued entry that still needs loading and is still asked
        for, dropping the rest (an expired ask stays in the CPU tier if it was read)."""
        now = self._clock()
        while self._queue:
            entry = self._queue[0]
            expiry = self._ask_expiry(entry)
            if self._is_current(entry) and entry.slot is None and (expiry is None or now < expiry):
                return entry
            self._finish_job(entry)
        return None

    def _finish_job(self, entry: AdapterEntry) -> None:
        """Under _lock: `entry` (the queue's head) is loaded, failed or obsolete."""
        assert self._queue and self._queue[0] is entry
        self._queue.popleft()
        entry.queued = entry.loading = False
        if self._held is not None and self._held.entry is entry:
            self._held = None

    def _allocate(self, nbytes: int) -> torch.Tensor:
        """The block for an adapter being read (any thread): from the CPU tier's arena."""
        with self._lock:
            return self._cpu.allocate(nbytes)

    def arena_stats(self) -> ArenaStats | None:
        """The CPU tier's memory: bytes in use and faulted in, recycled allocations."""
        return self._arena.stats() if self._arena is not None else None

    def _loader_step(self) -> bool:
        """The loader thread's unit of work: a load step, or else (nothing to load now)
        faulting in the next chunk of the CPU tier's memory ahead of the next loads."""
        if self._step():
            return True
        return self._arena is not None and self._arena.prefault_step()

    def _step(self) -> bool:
        """One unit of loader work: read the head of the queue, or write it into a slot.

        Returns False when there is nothing to do or the head waits for a slot.
        """
        try:
            return self._step_unguarded()
        except Exception as e:  # a bug, not a bad adapter: fail that one load, keep going
            log.exception("adapter loader failed")
            with self._lock:
                if self._queue:
                    entry = self._queue[0]
                    entry.fail(RuntimeError(f"internal error while loading: {e!r}"))
                    self._finish_job(entry)
            return True

    def _step_unguarded(self) -> bool:
        with self._lock:
            entry = self._next_job()
            if entry is None:
                return False
            in_hand = self._held if self._held is not None and self._held.entry is entry else None
            if in_hand is None:
                adapter = self._cpu.get(entry.key)
                if adapter is not None:
                    self._counters.cpu_hits += 1
                    in_hand = self._held = _InHand(entry, adapter, "cpu", 0.0)
            entry.loading = True

        if in_hand is None:  # 1. disk -> CPU tier (or built, for a derived adapter)
            source = "merge" if entry.build is not None else "disk"
            start = time.perf_counter()
            try:
                if entry.build is not None:
                    adapter = entry.build(self.dtype)
                else:
                    adapter = self._load_fn(
                        entry.adapter_id, entry.directory, self.spec, self.max_rank, self.dtype
                    )
            except Exception as e:  # AdapterError, or a MemoryError / bug in a hook
                if not isinstance(e, AdapterError):
                    log.exception("loading adapter %r failed", entry.adapter_id)
                self._fail_load(entry, e, source)
                return True
            read_s = time.perf_counter() - start
            with self._lock:
                self._counters.cpu_misses += 1
                if not self._is_current(entry):  # replaced or deleted while reading
                    self._finish_job(entry)
                    return True
                self._cpu.put(entry.key, adapter)
                in_hand = self._held = _InHand(entry, adapter, source, read_s)

        with self._lock:  # 2. a free slot, or the policy's first evictable one
            if not self._is_current(entry):
                self._finish_job(entry)
                return True
            reserved = self._slots.reserve(self._clock())
            if reserved is None:
                entry.loading = False  # waits in hand (and in the CPU tier) for a slot
                return False
            slot, evicted = reserved
            if evicted is not None:
                evicted.slot = None  # not resident any more: pin() returns None for it

        start = time.perf_counter()  # 3. CPU -> device, complete before it is published
        try:
            self._writer.write(slot, in_hand.adapter)
        except Exception as e:
            log.exception("writing adapter %r into slot %d failed", entry.adapter_id, slot)
            with self._lock:
                self._slots.release(slot)
            self._fail_load(entry, e, in_hand.source)
            return True
        load_s = in_hand.read_s + time.perf_counter() - start

        with self._lock:  # 4. publish: pinnable from now on
            if not self._is_current(entry):
                self._slots.release(slot)
                self._finish_job(entry)
                return True
            now = self._clock()
            self._slots.publish(
                slot,
                entry,
                in_hand.adapter.num_bytes,
                fresh_until=now + self.config.fresh_grace_s,
                protected=entry.adapter_id in self._permanent,
            )
            entry.slot = slot
            self._finish_job(entry)
            self._counters.loads += 1
            self._counters.latencies.append(load_s)
            event = LoadEvent(
                entry.adapter_id,
                entry.version,
                in_hand.source,
                True,
                load_s,
                now - entry.queued_at,
            )
        self._report(event)
        return True

    def _fail_load(self, entry: AdapterEntry, error: Exception, source: str) -> None:
        with self._lock:
            current = self._is_current(entry)
            if current:
                entry.fail(error)
                self._counters.load_failures += 1
            self._finish_job(entry)
            event = LoadEvent(
                entry.adapter_id,
                entry.version,
                source,
                False,
                0.0,
                self._clock() - entry.queued_at,
                str(error),
            )
        if current:
            log.warning("adapter %r failed to load: %s", entry.adapter_id, error)
            self._report(event)

    def _report(self, event: LoadEvent) -> None:
        if self._on_load is None:
            return
        try:
            self._on_load(event)
        except Exception:
            log.exception("on_load hook failed")

    # ------------------------------------------------------------------ records

    def _info_locked(self, entry: AdapterEntry) -> AdapterInfo:
        with self._lock:
            return self._info(entry)

    def _info(self, entry: AdapterEntry) -> AdapterInfo:
        """Under _lock."""
        leases = self._slots.refs(entry.slot) if entry.slot is not None else 0
        pinned = entry.adapter_id in self._permanent
        return adapter_info(entry, entry.key in self._cpu, pinned, leases)


def _max_adapter_bytes(spec: BaseModelSpec, max_rank: int, dtype: torch.dtype) -> int:
    """The most one adapter of rank <= max_rank can take in the arena (alignment included)."""
    per_layer = sum(max_rank * (i + o) for i, o in spec.module_shapes.values())
    num_tensors = 2 * spec.num_layers * len(spec.module_shapes)
    return spec.num_layers * per_layer * dtype.itemsize + num_tensors * ALIGN
