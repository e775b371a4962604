"""Host memory of the CPU tier: one mapping, faulted in ahead of need, blocks recycled.

A fresh allocation of an adapter's size (tens of MB) pays a page fault per 4 KiB page on
first write, more than the copy itself on some machines: cold loads were bimodal. So the
tier's weights live in one anonymous mapping of `capacity_bytes` (the CPU tier's budget
plus room for the adapter in hand), and:
  - `prefault_step` faults in the next chunk beyond the highest block ever handed out
    (MADV_POPULATE_WRITE: the kernel maps writable pages without touching their content,
    so it never races a block being written), up to `prefault_ahead_bytes` ahead; the
    loader thread runs it while it has nothing to load;
  - `allocate` hands out the lowest free range that fits (first fit, 64-byte aligned), so
    recycled memory is preferred over fresh pages;
  - a block returns to the arena when the last tensor viewing it dies (a weakref finalizer
    on the block's buffer object), never earlier: an evicted adapter that the loader still
    holds keeps its memory. Frees are queued lock-free and applied by the next call.
`allocate` returns None when no free range fits; the caller evicts and retries, or falls
back to fresh memory.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ALIGN = 64  # bytes; every block and every carved tensor starts on a cache line
PREFAULT_CHUNK = 2 << 20  # bytes faulted in per prefault_step (~1 ms: a load waits at most that)
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14

HostAlloc = Callable[[int], torch.Tensor]  # nbytes -> uint8 [nbytes] it owns


def fresh_alloc(nbytes: int) -> torch.Tensor:
    """The default HostAlloc: plain (unfaulted) memory from the allocator."""
    return torch.empty(nbytes, dtype=torch.uint8)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class ArenaStats:
    capacity_bytes: int
    used_bytes: int  # in live blocks (cached adapters, and any still referenced elsewhere)
    faulted_bytes: int  # [0, faulted_bytes) of the mapping is faulted in (or written)
    prefault_target_bytes: int  # where prefault_step stops (it moves with the highest block)
    num_allocations: int
    num_recycled: int  # allocations served entirely from memory faulted in before
    num_unfaulted: int  # allocations that reached past the faulted part (fresh pages)


class CpuArena:
    def __init__(self, capacity_bytes: int, prefault_ahead_bytes: int) -> None:
        self.capacity_bytes = _round_up(max(capacity_bytes, 0), mmap.PAGESIZE)
        self.prefault_ahead_bytes = max(prefault_ahead_bytes, 0)
        self._map = mmap.mmap(-1, self.capacity_bytes) if self.capacity_bytes else None
        self._buffer = memoryview(self._map) if self._map is not None else None
        self._lock = threading.Lock()
        self._free_starts: list[int] = [0] if self.capacity_bytes else []  # sorted
        self._free_sizes: dict[int, int] = {0: self.capacity_bytes} if self.capacity_bytes else {}
        self._released: deque[tuple[int, int]] = deque()  # (start, size) from finalizers
        self._faulted = 0  # [0, _faulted) is faulted in; [_faulted, capacity) was never handed out
        self._high_water = 0  # the end of the highest block ever handed out (<= _faulted)
        self._prefaulting = False
        self._used = 0
        self._num_allocations = self._num_recycled = self._num_unfaulted = 0

    # ------------------------------------------------------------------ allocation

    def allocate(self, nbytes: int) -> torch.Tensor | None:
        """uint8 [nbytes] in the arena, or None when no free range fits."""
        size = _round_up(max(nbytes, 1), ALIGN)
        with self._lock:
            self._apply_releases()
            start = self._first_fit(size)
            if start is None:
                return None
            self._take(start, size)
            end = start + size
            self._num_allocations += 1
            if end <= self._faulted:
                self._num_recycled += 1
            else:
                self._num_unfaulted += 1
                self._faulted = end  # written by the caller now: faulted from here on
            self._high_water = max(self._high_water, end)
            self._used += size
        piece = self._buffer[start:end]
        # The finalizer runs when the last tensor over `piece` is gone (torch keeps the
        # buffer object alive as long as any view of its storage).
        weakref.finalize(piece, self._released.append, (start, size)).atexit = False
        return torch.frombuffer(piece, dtype=torch.uint8)[:nbytes]

    def _first_fit(self, size: int) -> int | None:
        for start in self._free_starts:
            if self._free_sizes[start] >= size:
                return start
        return None

    def _take(self, start: int, size: int) -> None:
        free = self._free_sizes.pop(start)
        self._free_starts.remove(start)
        if free > size:
            self._insert_free(start + size, free - size)

    def _insert_free(self, start: int, size: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free_sizes[start] = size

    def _apply_releases(self) -> None:
        """Under _lock: return finalized blocks to the free list, merging neighbours."""
        while self._released:
            start, size = self._released.popleft()
            self._used -= size
            index = bisect.bisect_left(self._free_starts, start)
            if index < len(self._free_starts) and start + size == self._free_starts[index]:
                size += self._free_sizes.pop(self._free_starts.pop(index))
            if index > 0:
                before = self._free_starts[index - 1]
                if before + self._free_sizes[before] == start:
                    self._free_sizes[before] += size
                    continue
            self._insert_free(start, size)

    # ------------------------------------------------------------------ prefault

    def prefault_target(self) -> int:
        """Under _lock: fault in up to prefault_ahead_bytes beyond the highest block."""
        return min(self.capacity_bytes, self._high_water + self.prefault_ahead_bytes)

    def prefault_step(self) -> bool:
        """Fault in the next chunk toward `prefault_target`; False when there is none."""
        with self._lock:
            if self._map is None or self._prefaulting:
                return False
            start = self._faulted
            end = min(self.prefault_target(), start + PREFAULT_CHUNK)
            if end <= start:
                return False
            self._prefaulting = True
        try:
            self._map.madvise(_MADV_POPULATE_WRITE, start, end - start)
        except OSError as e:  # an older kernel: memory faults in on first write instead
            log.info("CPU tier memory cannot be faulted in ahead (%s); it faults in on first use", e)
            self.prefault_ahead_bytes = 0
            return False
        finally:
            with self._lock:
                self._prefaulting = False
        with self._lock:
            self._faulted = max(self._faulted, end)
        return True

    def stats(self) -> ArenaStats:
        with self._lock:
            self._apply_releases()
            return ArenaStats(
                self.capacity_bytes,
                self._used,
                self._faulted,
                self.prefault_target(),
                self._num_allocations,
                self._num_recycled,
                self._num_unfaulted,
            )


class BlockCarver:
    """Tensors carved one after another out of one uint8 block, each 64-byte aligned."""

    def __init__(self, block: torch.Tensor) -> None:
        self._block = block  # uint8 [nbytes]
        self._offset = 0

    @staticmethod
    def nbytes(shapes: Sequence[tuple[Sequence[int], torch.dtype]]) -> int:
        """Bytes of a block that holds tensors of these (shape, dtype), in order."""
        return sum(_round_up(_numel(shape) * dtype.itemsize, ALIGN) for shape, dtype in shapes)

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        size = _numel(shape) * dtype.itemsize
        piece = self._block[self._offset : self._offset + size]
        assert piece.numel() == size, "block too small for the planned tensors"
        self._offset += _round_up(size, ALIGN)
        return piece.view(dtype).view(*shape)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
