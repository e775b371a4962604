"""A step's host-built metadata, sent to the device in one copy.

Each metadata builder (token ids and positions, LoRA segments, attention block tables)
`add`s its host tensors and gets a handle; the runner calls `send` once, after every
builder has staged its part, and each builder then reads its pieces with `get`. On the
device the pieces are views of one buffer: the raw bytes of all pieces (each 8-byte
aligned, any dtypes) went over in one (pinned, asynchronous) copy instead of one small
copy per tensor. On the CPU nothing is copied: `get` returns the host tensor itself.
"""

from __future__ import annotations

import torch

_ALIGN = 8  # bytes: every piece can be viewed as any dtype up to 8 bytes wide


class DeviceUpload:
    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._pieces: list[torch.Tensor] = []
        self._on_device: list[torch.Tensor] | None = None
        self.num_copies = 0  # host-to-device copies made (0 on the CPU, else 1 after send)

    def add(self, tensor: torch.Tensor) -> int:
        """Stage a host tensor; returns its handle for `get`."""
        if self._on_device is not None:
            raise RuntimeError("add() after send()")
        if tensor.device.type != "cpu":
            raise ValueError("DeviceUpload stages host tensors")
        self._pieces.append(tensor.contiguous())
        return len(self._pieces) - 1

    def send(self) -> None:
        """The one host-to-device copy of everything staged."""
        if self._on_device is not None:
            raise RuntimeError("send() called twice")
        if self.device.type == "cpu" or not self._pieces:
            self._on_device = self._pieces
            return
        sizes = [p.numel() * p.element_size() for p in self._pieces]
        offsets, total = [], 0
        for size in sizes:
            offsets.append(total)
            total += -(-size // _ALIGN) * _ALIGN
        host = torch.empty(total, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        for piece, offset, size in zip(self._pieces, offsets, sizes):
            host[offset : offset + size] = piece.view(-1).view(torch.uint8)
        buffer = host.to(self.device, non_blocking=True)
        self.num_copies += 1
        self._on_device = [
            buffer[offset : offset + size].view(piece.dtype).view(piece.shape)
            for piece, offset, size in zip(self._pieces, offsets, sizes)
        ]

    def get(self, handle: int) -> torch.Tensor:
        """The staged piece on the device (after `send`)."""
        if self._on_device is None:
            raise RuntimeError("get() before send()")
        return self._on_device[handle]
