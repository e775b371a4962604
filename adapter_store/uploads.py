"""The upload area: where uploaded adapters are staged, validated and kept.

    <root>/.staging/<random>/   files being written and validated; cleared at start
    <root>/<id>/<version>/      a committed version: adapter_config.json + safetensors

An upload is written under .staging, validated there by the store, then renamed into
place in one step, so a half-written or invalid adapter is never visible under its id.
The committed path is built only from an id that passed adapter_store.ids and an int
version. Not thread-safe on its own: the store serializes commits.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from loramux.adapter_store.errors import (
    AdapterIdConflict,
    AdapterNotFound,
    AdapterUnsupported,
    UploadTooLarge,
)
from loramux.adapter_store.format import CONFIG_NAME, PICKLED_WEIGHTS_NAME, WEIGHTS_NAME
from loramux.adapter_store.ids import check_adapter_id, is_valid_adapter_id

log = logging.getLogger(__name__)

STAGING_NAME = ".staging"  # a name no adapter id can have (ids start alphanumeric)
_COPY_CHUNK = 1 << 20


class UploadArea:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.staging_root = self.root / STAGING_NAME
        self.max_bytes = max_bytes

    def prepare(self) -> None:
        """Create the area and clear what a previous process left half-written."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging_root, ignore_errors=True)
        self.staging_root.mkdir(exist_ok=True)

    def stage_files(self, adapter_id: str, config_json: bytes, weights: bytes) -> Path:
        """Write the two files into a new staging directory; raises UploadTooLarge."""
        total = len(config_json) + len(weights)
        if total > self.max_bytes:
            raise UploadTooLarge(adapter_id, None, total, self.max_bytes)
        staging = self._new_staging()
        try:
            _write(staging / CONFIG_NAME, config_json)
            _write(staging / WEIGHTS_NAME, weights)
        except BaseException:
            self.remove_staging(staging)
            raise
        return staging

    def stage_directory(self, adapter_id: str, source: Path) -> Path:
        """Copy an adapter directory's two files into a new staging directory.

        Only adapter_config.json and adapter_model.safetensors are copied. The caller must
        trust `source` (a path on this machine, e.g. from an admin), unlike an id.
        """
        source = Path(source)
        if not source.is_dir():
            raise AdapterNotFound(adapter_id, source, "no adapter directory here")
        if not (source / WEIGHTS_NAME).exists() and (source / PICKLED_WEIGHTS_NAME).exists():
            raise AdapterUnsupported(
                adapter_id,
                source / PICKLED_WEIGHTS_NAME,
                f"pickled weights ({PICKLED_WEIGHTS_NAME})",
                f"convert it to {WEIGHTS_NAME}",
            )
        names = (CONFIG_NAME, WEIGHTS_NAME)
        total = sum((source / n).stat().st_size for n in names if (source / n).is_file())
        if total > self.max_bytes:
            raise UploadTooLarge(adapter_id, source, total, self.max_bytes)
        staging = self._new_staging()
        try:
            copied = 0
            for name in names:  # bounded again: a file may grow while it is copied
                copied = _copy_bounded(
                    adapter_id, source / name, staging / name, copied, self.max_bytes
                )
        except BaseException:
            self.remove_staging(staging)
            raise
        return staging

    def commit(self, staging: Path, adapter_id: str, version: int) -> Path:
        """Rename a validated staging directory to <root>/<id>/<version>; returns that path.

        Raises AdapterIdConflict when another id that differs only in case has a folder here.
        """
        check_adapter_id(adapter_id)  # the only place an id becomes a path: check again
        self.check_case_unique(adapter_id)
        final = self.root / adapter_id / str(int(version))
        assert final.parent.parent == self.root, final
        final.parent.mkdir(exist_ok=True)
        if final.exists():  # left over from an earlier process whose removal failed
            shutil.rmtree(final)
        os.rename(staging, final)
        return final

    def check_case_unique(self, adapter_id: str) -> None:
        """Refuse an id whose folder would be another id's on a case-insensitive filesystem."""
        folded = adapter_id.lower()
        with os.scandir(self.root) as it:
            for entry in it:
                if entry.name != adapter_id and entry.name.lower() == folded:
                    raise AdapterIdConflict(
                        adapter_id,
                        None,
                        f"an uploaded adapter {entry.name!r} already exists; ids that differ only "
                        "in case cannot both be uploaded (they would share files)",
                    )

    def scan(self) -> Iterator[tuple[str, int, Path]]:
        """(adapter_id, version, directory) of the newest committed version of each id.

        Older versions (left when a process stopped before removing them) are removed.
        """
        with os.scandir(self.root) as it:
            ids = sorted(e.name for e in it if e.is_dir() and e.name != STAGING_NAME)
        for adapter_id in ids:
            if not is_valid_adapter_id(adapter_id):
                log.warning("skipping %s: not a valid adapter id", self.root / adapter_id)
                continue
            with os.scandir(self.root / adapter_id) as it:
                versions = sorted(int(e.name) for e in it if e.name.isdigit() and e.is_dir())
            if not versions:
                continue
            for old in versions[:-1]:
                self.remove_version(self.root / adapter_id / str(old))
            yield adapter_id, versions[-1], self.root / adapter_id / str(versions[-1])

    def remove_staging(self, staging: Path) -> None:
        assert staging.parent == self.staging_root, staging
        shutil.rmtree(staging, ignore_errors=True)

    def remove_version(self, directory: Path) -> None:
        """Remove a committed <root>/<id>/<version>, and the id's folder once empty."""
        assert directory.parent.parent == self.root, directory
        shutil.rmtree(directory, ignore_errors=True)
        try:
            directory.parent.rmdir()  # fails unless empty
        except OSError:
            pass

    def _new_staging(self) -> Path:
        self.staging_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="upload-", dir=self.staging_root))


def _write(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _copy_bounded(adapter_id: str, src: Path, dst: Path, copied: int, max_bytes: int) -> int:
    """Copy src to dst; returns `copied` plus its size, refusing a total over max_bytes."""
    try:
        source = open(src, "rb")
    except FileNotFoundError:
        raise AdapterNotFound(adapter_id, src, f"missing {src.name}") from None
    with source, open(dst, "xb") as out:
        while chunk := source.read(_COPY_CHUNK):
            copied += len(chunk)
            if copied > max_bytes:
                raise UploadTooLarge(adapter_id, src, copied, max_bytes)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return copied
