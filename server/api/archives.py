"""Read an adapter's two files out of an uploaded .zip / .tar(.gz) archive, safely.

Only members named adapter_config.json and adapter_model.safetensors (at any depth) are
read; links, devices and everything else are ignored; what is read is capped in size, so a
compression bomb stops at the cap. Nothing is written to disk here.
"""

from __future__ import annotations

import io
import tarfile
import zipfile

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WANTED = (CONFIG_NAME, WEIGHTS_NAME)


class ArchiveError(ValueError):
    """The archive is unreadable, lacks a file, holds one twice, or is too large."""


def _basename(name: str) -> str:
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _read_capped(stream, budget: int, name: str) -> bytes:
    data = stream.read(budget + 1)
    if len(data) > budget:
        raise ArchiveError(f"{name} in the archive exceeds the upload limit")
    return data


def extract_adapter_files(data: bytes, max_bytes: int) -> tuple[bytes, bytes]:
    """-> (adapter_config.json bytes, adapter_model.safetensors bytes)."""
    found: dict[str, bytes] = {}
    budget = max_bytes

    def keep(name: str, read) -> None:
        nonlocal budget
        base = _basename(name)
        if base not in WANTED:
            return
        if base in found:
            raise ArchiveError(f"the archive holds {base} more than once")
        found[base] = read(budget)
        budget -= len(found[base])

    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    if info.is_dir() or (info.external_attr >> 16) & 0o170000 == 0o120000:  # dirs, symlinks
                        continue
                    keep(info.filename, lambda cap, info=info: _read_capped(archive.open(info), cap, info.filename))
        except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
            raise ArchiveError(f"unreadable zip archive: {exc}") from None
    else:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
                for member in archive:
                    if not member.isfile():  # links, devices, directories
                        continue
                    stream = archive.extractfile(member)
                    if stream is not None:
                        keep(member.name, lambda cap, s=stream, m=member: _read_capped(s, cap, m.name))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise ArchiveError(f"not a readable .zip or .tar(.gz) archive: {exc}") from None
    missing = [name for name in WANTED if name not in found]
    if missing:
        raise ArchiveError(f"the archive lacks {', '.join(missing)}")
    return found[CONFIG_NAME], found[WEIGHTS_NAME]
