"""Zero-copy views of a safetensors file's tensors, at a few microseconds each.

safe_open(...).get_tensor costs ~14 us a tensor in Python-level storage slicing; an
adapter of a 30-layer model has 420 of them, a fifth of a cold load. Here the file is
mapped once and each tensor is a slice of one uint8 tensor over the mapping. The header
is read after safe_open has validated it (JSON, dtypes, offsets inside the file); a file
replaced in between is caught by the size checks in `get` (FileChanged).
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import torch

_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class FileChanged(ValueError):
    """The file no longer matches the header safe_open validated."""


class MisalignedTensor(ValueError):
    """A tensor's data does not start at a multiple of its element size. safetensors'
    writers align every tensor; a view cannot be taken of an unaligned one."""


class SafetensorsViews:
    """`get(key)`: the tensor as stored, a view of the file's (private, copy-on-write) mapping."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as file:
            header_len = int.from_bytes(file.read(8), "little")
            self._header = json.loads(file.read(header_len))
            # ACCESS_COPY: writable for torch.frombuffer, never written, so never copied.
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        self._data_start = 8 + header_len
        self._bytes = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps `mapping` alive
        # dtype -> the whole mapping viewed as that dtype: one as_strided call per tensor
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    def entry(self, key: str) -> tuple[str, list[int]]:
        """(dtype name as stored, e.g. "F32", shape) from the header, reading no data."""
        entry = self._entry(key)
        return entry.get("dtype"), entry.get("shape")

    def _entry(self, key: str) -> dict:
        entry = self._header.get(key)
        if not isinstance(entry, dict):
            raise FileChanged(f"tensor {key!r} is missing")
        return entry

    def get(self, key: str) -> torch.Tensor:
        entry = self._entry(key)
        if entry.get("dtype") not in _DTYPES:
            raise FileChanged(f"tensor {key!r} is not a float tensor")
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        start, stop = self._data_start + begin, self._data_start + end
        if stop > self._bytes.numel() or stop - start != math.prod(shape) * dtype.itemsize:
            raise FileChanged(f"tensor {key!r} does not fit the file")
        if start % dtype.itemsize:
            raise MisalignedTensor(
                f"tensor {key!r} starts at byte {start} of the file, not a multiple of its "
                f"{dtype.itemsize}-byte dtype {entry['dtype']} (re-save it with safetensors)"
            )
        typed = self._typed.get(dtype)
        if typed is None:
            whole = self._bytes.numel() // dtype.itemsize * dtype.itemsize
            typed = self._typed[dtype] = self._bytes[:whole].view(dtype)
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]  # contiguous
        return typed.as_strided(shape, strides, start // dtype.itemsize)
