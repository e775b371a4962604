"""Paged KV-cache block accounting: which block ids each request holds. No tensors here.

The runner owns the KV tensors `[num_kv_blocks, block_size, ...]`; this module only decides
which block ids a request's tokens go to. Token t of a request lives in block
`request.block_ids[t // block_size]` at offset `t % block_size`.
"""

from __future__ import annotations

from collections import deque

from loramux.scheduler.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks  # total blocks in the pool
        self.block_size = block_size  # tokens per block
        self._free: deque[int] = deque(range(num_blocks))  # [num_free_blocks] block ids
        self._in_use: set[int] = set()  # block ids held by some request

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1."""
        return len(self._in_use) / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow request.block_ids so num_computed_tokens + num_new_tokens tokens fit.

        All or nothing: returns False and changes nothing when the free list is too short.
        """
        assert num_new_tokens >= 0, num_new_tokens
        total = request.num_computed_tokens + num_new_tokens
        num_needed = self.num_blocks_for(total) - len(request.block_ids)
        if num_needed <= 0:
            return True
        if num_needed > len(self._free):
            return False
        new_blocks = [self._free.popleft() for _ in range(num_needed)]
        assert self._in_use.isdisjoint(new_blocks), "a free block was already in use"
        self._in_use.update(new_blocks)
        request.block_ids.extend(new_blocks)
        return True

    def free(self, request: Request) -> None:
        """Return all of request's blocks to the free list (a no-op when it holds none)."""
        blocks, request.block_ids = request.block_ids, []
        for block in blocks:
            assert block in self._in_use, f"block {block} freed twice"
            self._in_use.remove(block)
        self._free.extend(blocks)
