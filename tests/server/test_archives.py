"""Uploaded archives: only .zip and .tar.gz, members and inflated bytes capped (skipped
members included), peft folders' extra files ignored and named, corrupt input refused
with ArchiveError, each within seconds."""

from __future__ import annotations

import gzip
import io
import lzma
import struct
import tarfile
import time
import zipfile

import pytest

from loramux.server.api.archives import (
    MAX_MEMBERS,
    ArchiveError,
    archive_format,
    extract_adapter_files,
)

CONFIG = b'{"r": 4}'
WEIGHTS = b"\x08" + bytes(100)
LIMIT = 1 << 20
# What peft's save_pretrained writes beside the two adapter files (and a trainer adds).
PEFT_EXTRAS = {"README.md": b"# model card", "tokenizer.json": b"{}", "training_args.bin": b"\x80\x04pickle"}


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def extract(data: bytes, kind: str, max_bytes: int = LIMIT):
    return extract_adapter_files(io.BytesIO(data), kind, max_bytes)


def tar_xz_of_zeros(num_mib: int) -> bytes:
    """A .tar.xz of one member of num_mib MiB of zeros, in ~num_mib * 100 bytes: xz allows
    concatenated streams, so one compressed MiB is repeated instead of compressing it all."""
    header = tarfile.TarInfo("adapter_model.safetensors")
    header.size = num_mib << 20
    mib = lzma.compress(bytes(1 << 20), preset=0)
    return lzma.compress(header.tobuf(), preset=0) + mib * num_mib + lzma.compress(bytes(1024), preset=0)


def tar_gz_of_empty_members(count: int, per_block: int = 1000) -> bytes:
    """A .tar.gz of `count` empty members, built from one gzip member repeated (gzip allows
    concatenated members), so building it costs milliseconds."""
    block = b"".join(tarfile.TarInfo(f"empty-{i}").tobuf() for i in range(per_block))
    return gzip.compress(block, 1) * (count // per_block) + gzip.compress(bytes(1024), 1)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_peft_folder_archive_is_read_and_its_extras_named(kind):
    members = {f"out/checkpoint/{n}": d for n, d in PEFT_EXTRAS.items()}
    members["out/checkpoint/adapter_config.json"] = CONFIG
    members["out/checkpoint/adapter_model.safetensors"] = WEIGHTS
    data = zip_bytes(members) if kind == "zip" else tar_gz_bytes(members)
    found = extract(data, kind)
    assert (found.config, found.weights) == (CONFIG, WEIGHTS)
    assert sorted(found.ignored) == sorted(f"out/checkpoint/{n}" for n in PEFT_EXTRAS)


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_only_pickled_weights_get_a_clear_refusal(kind):
    members = {"adapter_config.json": CONFIG, "adapter_model.bin": b"\x80\x04pickle"}
    data = zip_bytes(members) if kind == "zip" else tar_gz_bytes(members)
    with pytest.raises(ArchiveError, match=r"pickled weights \(adapter_model.bin\).*never loaded"):
        extract(data, kind)


@pytest.mark.parametrize(
    "name, kind",
    [("a.zip", "zip"), ("a.ZIP", "zip"), ("a.tar.gz", "tar.gz"), ("a.tgz", "tar.gz"), ("README.md", None),
     ("adapter_model.safetensors", None)],
)
def test_archive_format_by_name(name, kind):
    assert archive_format(name) == kind


@pytest.mark.parametrize("name", ["a.tar.xz", "a.tar", "a.tar.bz2", "a.7z", "a.tar.zst", "a.rar"])
def test_other_archive_formats_are_refused_by_name(name):
    with pytest.raises(ArchiveError, match="only .zip and .tar.gz"):
        archive_format(name)


def test_a_tar_xz_bomb_sent_as_tar_gz_is_refused_by_its_first_bytes():
    data = tar_xz_of_zeros(400)  # 400 MiB of zeros
    started = time.monotonic()
    with pytest.raises(ArchiveError, match="not a gzip-compressed tar"):
        extract(data, "tar.gz", max_bytes=1 << 40)
    assert time.monotonic() - started < 1.0


def test_200000_empty_members_are_refused_within_seconds():
    data = tar_gz_of_empty_members(200_000)
    started = time.monotonic()
    with pytest.raises(ArchiveError, match=f"more than {MAX_MEMBERS} members"):
        extract(data, "tar.gz", max_bytes=1 << 40)
    assert time.monotonic() - started < 2.0


def test_a_zip_with_too_many_members_is_refused_before_its_directory_is_parsed(monkeypatch):
    data = zip_bytes({f"f{i}": b"" for i in range(MAX_MEMBERS + 1)}, zipfile.ZIP_STORED)

    def no_parse(*args, **kwargs):
        raise AssertionError("the central directory was parsed")

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", no_parse)
    with pytest.raises(ArchiveError, match="members"):
        extract(data, "zip")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_skipped_members_count_toward_the_inflated_bytes(kind):
    """A bomb in a member nobody reads is still a bomb: it is refused, not skipped."""
    members = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS,
               "README.md": bytes(LIMIT + 1)}
    data = zip_bytes(members) if kind == "zip" else tar_gz_bytes(members)
    assert len(data) < LIMIT // 100
    with pytest.raises(ArchiveError, match="expands to more than the upload limit"):
        extract(data, kind)


def test_a_zip_member_that_lies_about_its_size_stops_at_the_declared_size():
    data = bytearray(zip_bytes({"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(1000)}))
    # Shrink the weights' declared size in the central directory: zipfile reads no further,
    # and the CRC over what it read no longer matches.
    at = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, at + 24, 10)
    with pytest.raises(ArchiveError):
        extract(bytes(data), "zip")


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d[: len(d) // 2],  # truncated: no end record
        lambda d: d[:40] + bytes(len(d) - 80) + d[-40:],  # zeroed middle: bad zlib data / CRC
        lambda d: d.replace(b"PK\x03\x04", b"PK\x03\x05"),  # local headers gone
        lambda d: b"PK\x05\x06" + bytes(18),  # an empty end record only
        lambda d: b"not a zip at all",
    ],
)
def test_a_corrupt_zip_is_an_archive_error(damage):
    data = zip_bytes({"adapter_config.json": CONFIG * 50, "adapter_model.safetensors": bytes(range(256)) * 40})
    started = time.monotonic()
    with pytest.raises(ArchiveError):
        extract(damage(data), "zip")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "damage",
    [lambda d: d[: len(d) // 2], lambda d: d[:20] + bytes(len(d) - 20), lambda d: b"\x1f\x8b" + bytes(30)],
)
def test_a_corrupt_tar_gz_is_an_archive_error(damage):
    data = tar_gz_bytes({"adapter_config.json": CONFIG, "adapter_model.safetensors": bytes(range(256)) * 40})
    with pytest.raises(ArchiveError):
        extract(damage(data), "tar.gz")


def test_a_zip_member_in_another_compression_method_is_refused():
    data = zip_bytes({"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS}, zipfile.ZIP_BZIP2)
    with pytest.raises(ArchiveError, match="zip method 12"):
        extract(data, "zip")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_file_twice_is_refused(kind):
    members = {"adapter_config.json": CONFIG, "adapter_model.safetensors": WEIGHTS, "x/adapter_config.json": CONFIG}
    data = zip_bytes(members) if kind == "zip" else tar_gz_bytes(members)
    with pytest.raises(ArchiveError, match="more than once"):
        extract(data, kind)
