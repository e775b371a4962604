"""Read an adapter's two files out of an uploaded .zip or .tar.gz archive, safely.

Only these two formats are read (a .tar.xz, .tar.bz2, .7z, ... is refused by its name and
again by its first bytes). Every archive is bounded before it costs much:
- members: at most `max_members`, counted from a zip's end-of-central-directory record
  before its directory is parsed, and header by header in a tar;
- bytes decompressed: at most `max_bytes` over all members, the skipped ones included
  (a zip's declared sizes, which zipfile never reads past; a tar's whole gzip stream,
  counted as it is inflated), so a bomb stops at the cap.
Only members named adapter_config.json and adapter_model.safetensors (at any depth) are
read; links, devices and directories are skipped; every other member (README.md,
tokenizer files, training_args.bin, ...) is ignored and named in the result. A pickled
adapter_model.bin is never read. Nothing is written to disk here. Blocking: run it off
the event loop.
"""

from __future__ import annotations

import gzip
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_WEIGHTS_NAME = "adapter_model.bin"
WANTED = (CONFIG_NAME, WEIGHTS_NAME)

# Archive name endings -> format. .tgz is the same gzip-compressed tar as .tar.gz.
ARCHIVE_SUFFIXES = {".zip": "zip", ".tar.gz": "tar.gz", ".tgz": "tar.gz"}
# Names that look like an archive of another format: refused with a message, not ignored.
OTHER_ARCHIVE_SUFFIXES = (".tar", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".tar.zst", ".7z", ".rar", ".xz",
                          ".bz2", ".gz", ".zst")
# A peft checkpoint folder has a handful of files; a training run's output a few hundred.
MAX_MEMBERS = 1000
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_MAX_COMMENT = 0xFFFF


class ArchiveError(ValueError):
    """The archive is unreadable, of another format, too large, or lacks a file."""


@dataclass(frozen=True)
class ArchiveFiles:
    config: bytes  # adapter_config.json
    weights: bytes  # adapter_model.safetensors
    ignored: tuple[str, ...]  # other members (files only), as named in the archive


def archive_format(filename: str) -> str | None:
    """"zip" or "tar.gz" for an archive name we read; None for a name that is no archive.

    Raises ArchiveError for an archive of another format (.tar.xz, plain .tar, ...).
    """
    lower = filename.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    if lower.endswith(OTHER_ARCHIVE_SUFFIXES):
        raise ArchiveError(f"{filename!r}: only .zip and .tar.gz archives are accepted")
    return None


def extract_adapter_files(
    source: BinaryIO, kind: str, max_bytes: int, max_members: int = MAX_MEMBERS
) -> ArchiveFiles:
    """The adapter's two files from a seekable archive file of format `kind`."""
    reader = _read_zip if kind == "zip" else _read_tar_gz
    found: dict[str, bytes] = {}
    ignored: list[str] = []
    try:
        reader(source, max_bytes, max_members, found, ignored)
    except ArchiveError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure inside a stranger's archive is its fault
        raise ArchiveError(f"corrupt {kind} archive: {type(exc).__name__}: {exc}") from None
    missing = [name for name in WANTED if name not in found]
    if WEIGHTS_NAME in missing and any(_basename(n) == PICKLED_WEIGHTS_NAME for n in ignored):
        raise ArchiveError(
            f"the archive holds pickled weights ({PICKLED_WEIGHTS_NAME}) but no {WEIGHTS_NAME}; "
            f"pickles are never loaded: save the adapter with safetensors (peft's default)"
        )
    if missing:
        raise ArchiveError(f"the archive lacks {', '.join(missing)}")
    return ArchiveFiles(found[CONFIG_NAME], found[WEIGHTS_NAME], tuple(ignored))


def _basename(name: str) -> str:
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _keep(found: dict[str, bytes], name: str, read: Callable[[], bytes], ignored: list[str]) -> None:
    base = _basename(name)
    if base not in WANTED:
        ignored.append(name)
        return
    if base in found:
        raise ArchiveError(f"the archive holds {base} more than once")
    found[base] = read()


def _too_large(max_bytes: int) -> ArchiveError:
    return ArchiveError(f"the archive expands to more than the upload limit of {max_bytes} bytes")


def _too_many(max_members: int) -> ArchiveError:
    return ArchiveError(f"the archive has more than {max_members} members")


# --------------------------------------------------------------------------- zip


def _zip_member_count(source: BinaryIO) -> int:
    """Members recorded in the end-of-central-directory record, read before zipfile parses
    the whole directory (a directory of millions of entries costs seconds and memory)."""
    size = source.seek(0, 2)
    tail_len = min(size, _EOCD_SIZE + _MAX_COMMENT)
    source.seek(size - tail_len)
    tail = source.read(tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < _EOCD_SIZE:
        raise ArchiveError("not a zip archive (no end of central directory record)")
    # total entries: offset 10, unsigned short; 0xFFFF means "see the ZIP64 record"
    (total,) = struct.unpack_from("<H", tail, at + 10)
    return total


def _read_zip(source, max_bytes, max_members, found, ignored) -> None:
    count = _zip_member_count(source)
    if count > max_members:  # 0xFFFF (ZIP64) counts as too many too
        raise _too_many(max_members)
    source.seek(0)
    with zipfile.ZipFile(source) as archive:
        infos = archive.infolist()
        if len(infos) > max_members:
            raise _too_many(max_members)
        # Declared sizes: zipfile never inflates past them (and checks the CRC at the end).
        if sum(info.file_size for info in infos) > max_bytes:
            raise _too_large(max_bytes)
        for info in infos:
            if info.is_dir() or (info.external_attr >> 16) & 0o170000 == 0o120000:  # symlinks
                continue
            _keep(found, info.filename, lambda info=info: _read_zip_member(archive, info), ignored)


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    if info.compress_type not in _ZIP_METHODS:
        raise ArchiveError(
            f"{info.filename} is compressed with zip method {info.compress_type}; "
            f"only {' and '.join(_ZIP_METHODS.values())} members are read"
        )
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{info.filename} is encrypted")
    with archive.open(info) as stream:
        return stream.read()


# --------------------------------------------------------------------------- tar.gz


class _CountingReader:
    """A read-only stream over the inflated gzip data that refuses to give more than
    `limit` bytes in all: the tar is walked as a stream, so skipped members count too."""

    def __init__(self, raw: BinaryIO, limit: int, on_limit: Callable[[], Exception]) -> None:
        self._raw = raw
        self._left = limit
        self._on_limit = on_limit

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._left + 1
        data = self._raw.read(min(size, self._left + 1))
        self._left -= len(data)
        if self._left < 0:
            raise self._on_limit()
        return data


def _read_tar_gz(source, max_bytes, max_members, found, ignored) -> None:
    source.seek(0)
    if source.read(2) != b"\x1f\x8b":
        raise ArchiveError("not a gzip-compressed tar archive (.tar.gz)")
    source.seek(0)
    inflated = _CountingReader(gzip.GzipFile(fileobj=source, mode="rb"), max_bytes,
                               lambda: _too_large(max_bytes))
    # "r|": a forward-only stream, so skipping a member reads (and counts) its bytes.
    with tarfile.open(fileobj=inflated, mode="r|") as archive:
        for number, member in enumerate(archive, start=1):
            if number > max_members:
                raise _too_many(max_members)
            if not member.isfile():  # links, devices, directories
                continue

            def read(member=member) -> bytes:
                stream = archive.extractfile(member)
                return stream.read() if stream is not None else b""

            _keep(found, member.name, read, ignored)
