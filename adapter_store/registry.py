"""The registry: every adapter the store knows, by id, with where its files are.

Registering reads only `adapter_config.json` and file sizes, never the weights, so
thousands of adapters register in seconds; the config is enough to know the adapter's
ranks, targets and size in the serving dtype (resolve_targets), and to refuse many bad
adapters early. An adapter whose config is bad is still registered, as failed, so requests
naming it get its error rather than "unknown adapter".

Every registration of an id is a new version (an `AdapterEntry` object of its own); the
store keys caches and slots by entry, so an old version is never served for a new one.
Not thread-safe on its own: the store calls it under its lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loramux.adapter_store.errors import (
    AdapterError,
    AdapterInvalid,
    AdapterNotFound,
    AdapterTooLarge,
    AdapterUnsupported,
)
from loramux.adapter_store.format import (
    CONFIG_NAME,
    PICKLED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    BaseModelSpec,
    LoraAdapterConfig,
    read_adapter_config,
    resolve_targets,
)
from loramux.adapter_store.ids import is_valid_adapter_id
from loramux.adapter_store.value_limits import check_scalings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterDescription:
    """What the config and file sizes say about an adapter (no weights read)."""

    rank: int  # max rank over the adapted projections
    target_modules: tuple[str, ...]  # adapted leaf names (q_proj, ...), in the spec's order
    num_bytes: int  # lora_A + lora_B bytes in the serving dtype (+ DoRA magnitudes): what a tier holds
    disk_bytes: int  # adapter_config.json + adapter_model.safetensors
    use_dora: bool = False  # DoRA: its magnitudes are fitted to the delta at full strength


@dataclass(slots=True, eq=False)  # eq=False: an entry is one version, compared by identity
class AdapterEntry:
    adapter_id: str
    version: int  # 1, 2, ... per id, never reused in a process (also across deletes)
    directory: Path | None  # from a scan or an upload commit, never from a request; None: derived
    owned: bool  # inside the upload root: the store removes it when the version goes
    description: AdapterDescription | None  # None when registering failed
    error: str | None = None  # sticky: set when registering or loading failed
    error_type: str | None = None  # the error's class name, e.g. "AdapterInvalid"
    slot: int | None = None  # the device slot holding this version, once published
    queued: bool = False  # in the loader's queue (a load was asked for)
    loading: bool = False  # the loader is reading or writing it right now
    queued_at: float = 0.0  # clock() when queued, for the load latency
    hinted_at: float | None = None  # clock() of the latest prefetch; None: not asked by one
    # derived adapters (merges): builds the weights in the given dtype instead of a disk read
    build: Callable[[torch.dtype], object] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.version)

    def fail(self, error: BaseException) -> None:
        # Shown to clients (request errors, adapter listings): no server paths in it.
        self.error = error.public_message() if isinstance(error, AdapterError) else str(error)
        self.error_type = type(error).__name__


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, AdapterEntry] = {}
        self._last_version: dict[str, int] = {}  # kept after delete: versions never repeat
        self.disk_bytes = 0  # over current entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, adapter_id: str) -> AdapterEntry | None:
        return self._entries.get(adapter_id)

    def entries(self) -> list[AdapterEntry]:
        return list(self._entries.values())

    def next_version(self, adapter_id: str) -> int:
        return self._last_version.get(adapter_id, 0) + 1

    def install(self, entry: AdapterEntry) -> AdapterEntry | None:
        """Make `entry` the current version of its id; returns the version it replaces."""
        assert entry.version >= self.next_version(entry.adapter_id), entry
        old = self.remove(entry.adapter_id)
        self._entries[entry.adapter_id] = entry
        self._last_version[entry.adapter_id] = entry.version
        self.disk_bytes += _disk_bytes(entry)
        return old

    def remove(self, adapter_id: str) -> AdapterEntry | None:
        old = self._entries.pop(adapter_id, None)
        if old is not None:
            self.disk_bytes -= _disk_bytes(old)
        return old


def _disk_bytes(entry: AdapterEntry) -> int:
    return entry.description.disk_bytes if entry.description is not None else 0


class Describer:
    """Describes adapter directories for one base model, max rank and serving dtype.

    Resolving targets costs a regex match per projection of the model; adapters trained
    with the same recipe share it, so results are cached by the config's serving fields.
    """

    _MAX_CACHED = 4096

    def __init__(self, spec: BaseModelSpec, max_rank: int, dtype: torch.dtype) -> None:
        self.spec = spec
        self.max_rank = max_rank
        self.dtype = dtype
        self._elem = torch.empty((), dtype=dtype).element_size()
        self._cache: dict[tuple, tuple[int, tuple[str, ...], int]] = {}

    def describe(self, adapter_id: str, directory: Path) -> AdapterDescription:
        """Read the config and file sizes of an adapter directory; never opens the weights.

        Raises what format.load_adapter would for a bad config, a missing or pickled
        weights file, or a rank above max_rank (AdapterNotFound / AdapterInvalid /
        AdapterUnsupported / AdapterTooLarge).
        """
        config = read_adapter_config(adapter_id, directory)
        config_path = directory / CONFIG_NAME
        weights_path = directory / WEIGHTS_NAME
        try:
            disk_bytes = weights_path.stat().st_size + config_path.stat().st_size
        except FileNotFoundError:
            if (directory / PICKLED_WEIGHTS_NAME).exists():
                raise AdapterUnsupported(
                    adapter_id,
                    directory / PICKLED_WEIGHTS_NAME,
                    f"pickled weights ({PICKLED_WEIGHTS_NAME})",
                    f"convert it to {WEIGHTS_NAME}",
                ) from None
            raise AdapterNotFound(adapter_id, weights_path, f"missing {WEIGHTS_NAME}") from None
        key = _serving_key(config)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._resolve(adapter_id, config, config_path)
            if len(self._cache) < self._MAX_CACHED:
                self._cache[key] = cached
        rank, target_modules, num_bytes = cached
        return AdapterDescription(rank, target_modules, num_bytes, disk_bytes, bool(config.use_dora))

    def describe_or_error(
        self, adapter_id: str, directory: Path
    ) -> tuple[AdapterDescription | None, AdapterError | None]:
        try:
            return self.describe(adapter_id, directory), None
        except AdapterError as e:
            return None, e
        except (OSError, ValueError) as e:  # a name too long, a NUL byte, no permission, ...
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            return None, AdapterInvalid(adapter_id, directory, f"cannot read the adapter: {reason}")

    def _resolve(
        self, adapter_id: str, config: LoraAdapterConfig, config_path: Path
    ) -> tuple[int, tuple[str, ...], int]:
        """(max rank, adapted leaf names in spec order, bytes in the serving dtype)."""
        spec = self.spec
        targets = resolve_targets(adapter_id, config, spec, config_path)
        (layer, module), largest = max(targets.items(), key=lambda item: item[1].rank)
        if largest.rank > self.max_rank:
            where = spec.module_name(layer, module)
            raise AdapterTooLarge(adapter_id, config_path, largest.rank, self.max_rank, where)
        check_scalings(
            adapter_id,
            config_path,
            {spec.module_name(*key): target.scaling for key, target in targets.items()},
            self.dtype,
        )
        # lora_a + lora_b in the serving dtype, and DoRA's fp32 magnitude [out] (as loaded)
        num_bytes = sum(
            t.rank * sum(spec.serving_shape(module)) * self._elem
            + (4 * spec.serving_shape(module)[1] if config.use_dora else 0)
            for (_, module), t in targets.items()
        )
        adapted = {module for _, module in targets}
        names = tuple(m for m in (*spec.module_shapes, *spec.outer_modules) if m in adapted)
        return largest.rank, names, num_bytes


def _serving_key(config: LoraAdapterConfig) -> tuple:
    """The config fields resolve_targets reads, as a hashable key."""
    return (
        config.r,
        config.lora_alpha,
        config.use_rslora,
        config.target_modules,
        tuple(config.rank_pattern.items()),
        tuple(config.alpha_pattern.items()),
        config.layers_to_transform,
        config.layers_pattern,
        config.exclude_modules,
        config.use_dora,
        config.ensure_weight_tying,
    )


def scan_adapter_dir(root: Path) -> Iterator[tuple[str, Path]]:
    """(adapter_id, directory) of every subfolder of `root` whose name is a valid id.

    Hidden entries and files are skipped silently, other invalid names with a warning.
    Raises FileNotFoundError / NotADirectoryError when root itself is missing.
    """
    with os.scandir(root) as it:
        found = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in found:
        if not entry.is_dir():
            continue
        if not is_valid_adapter_id(entry.name):
            log.warning("skipping %s: its name is not a valid adapter id", entry.path)
            continue
        yield entry.name, Path(entry.path)

