"""Paged KV-cache block accounting with prefix caching: which block ids each request holds.

The runner owns the KV tensors `[num_kv_blocks, block_size, ...]`; this module only decides
which block ids a request's tokens go to. Token t of a request lives in block
`request.block_ids[t // block_size]` at offset `t % block_size`.

Prefix caching (vLLM v1's design, keyed by adapter). Every block has a reference count (the
requests holding it). Once a block is full and computed, it is registered under the hash
of its chain (block_hash.py: the tokens so far, seeded with the adapter id and version).
A block whose count drops to 0 keeps its content and registration and joins the evictable
pool (LRU); a new request with the same adapter version and the same leading tokens takes
the longest registered chain and computes only the rest. New blocks come from blocks that
hold nothing cached first, then from the evictable pool, least recently freed first, so
cached content goes before any running request is preempted (preemption only happens when
both are empty). Only full blocks are shared and a request never writes into a block before
its num_computed_tokens, so a shared block is never written.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

from loramux.scheduler.block_hash import BlockHash, extend_chain, root_hash
from loramux.scheduler.prefix_cache_stats import PrefixCacheStats
from loramux.scheduler.request import Request


@dataclass(frozen=True)
class CachedPrefix:
    """The result of a lookup, handed back to admit()."""

    root: BlockHash  # the chain's seed (adapter id and version)
    block_hashes: list[BlockHash]  # [num_full_prompt_blocks] chain of the request's full blocks
    block_ids: list[int]  # [num_hit_blocks] cached blocks of the longest matching chain
    looked_up: bool = True  # False: hashed only (the request may not read the cache)


@dataclass
class _Chain:
    """Hashes of one request's blocks, as far as they are known."""

    root: BlockHash
    hashes: list[BlockHash] = field(default_factory=list)  # [num_hashed_blocks]
    num_registered: int = 0  # leading blocks already registered in (or found from) the cache


NO_PREFIX = CachedPrefix(b"", [], [], looked_up=False)  # prefix caching off


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks  # total blocks in the pool
        self.block_size = block_size  # tokens per block
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks  # [num_blocks] requests holding each block
        self._free_uncached: deque[int] = deque(range(num_blocks))  # free, holding nothing cached
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; LRU first
        self._block_hash: list[BlockHash | None] = [None] * num_blocks  # [num_blocks]
        self._cached: dict[BlockHash, int] = {}  # chain hash -> the block holding it
        self._chains: dict[str, _Chain] = {}  # request_id -> its chain (while it holds blocks)
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ figures

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached or not): what an allocation can take."""
        return len(self._free_uncached) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (held or evictable)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests, 0..1 (evictable cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def is_cached(self, block: int) -> bool:
        """True while block is registered in the prefix cache (its content is frozen)."""
        return self._block_hash[block] is not None

    # ------------------------------------------------------------------ admission

    def find_cached_prefix(
        self,
        request: Request,
        adapter_id: str | None,
        adapter_version: int | None,
        read: bool = True,
        adapter_scale: float = 1.0,
    ) -> CachedPrefix:
        """The longest cached chain of request's leading full blocks under this adapter version.

        At least one token is always left to compute (the runner samples from its row), so
        at most (num_tokens - 1) // block_size blocks can hit. read=False hashes without
        looking up (the request still registers its blocks for others).
        """
        if not self.enable_prefix_caching:
            return NO_PREFIX
        root = root_hash(adapter_id, adapter_version, adapter_scale)
        hashes: list[BlockHash] = []
        num_full = (request.num_tokens - 1) // self.block_size
        extend_chain(hashes, root, request.all_token_ids, self.block_size, num_full)
        hits: list[int] = []
        if read:
            for block_hash in hashes:
                block = self._cached.get(block_hash)
                if block is None:
                    break
                hits.append(block)
        return CachedPrefix(root, hashes, hits, looked_up=read)

    def admit(self, request: Request, prefix: CachedPrefix, num_new_tokens: int) -> bool:
        """Give a waiting request its cached prefix blocks plus room for num_new_tokens more.

        All or nothing: returns False and changes nothing when the blocks do not fit. On
        success the caller sets num_computed_tokens to the prefix's tokens.
        """
        assert not request.block_ids and request.num_computed_tokens == 0, request.request_id
        assert num_new_tokens >= 1, num_new_tokens
        num_hit_tokens = len(prefix.block_ids) * self.block_size
        num_needed = self.num_blocks_for(num_hit_tokens + num_new_tokens) - len(prefix.block_ids)
        # Hit blocks nobody holds leave the evictable pool when taken: they are not room.
        num_hits_free = sum(1 for b in prefix.block_ids if self._ref_counts[b] == 0)
        if num_needed > self.num_free_blocks - num_hits_free:
            return False
        for block in prefix.block_ids:
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        request.block_ids = list(prefix.block_ids) + self._take(num_needed)
        if prefix is not NO_PREFIX:
            self._chains[request.request_id] = _Chain(
                prefix.root, list(prefix.block_hashes), len(prefix.block_ids)
            )
        if prefix.looked_up and prefix is not NO_PREFIX:
            self.stats.record(
                request.adapter_id,
                request.num_tokens,
                num_hit_tokens,
                len(prefix.block_hashes),
                len(prefix.block_ids),
            )
        return True

    # ------------------------------------------------------------------ running requests

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow request.block_ids so num_computed_tokens + num_new_tokens tokens fit.

        All or nothing: returns False and changes nothing when the free blocks (uncached,
        then evictable cached ones) are too few.
        """
        assert num_new_tokens >= 0, num_new_tokens
        total = request.num_computed_tokens + num_new_tokens
        num_needed = self.num_blocks_for(total) - len(request.block_ids)
        if num_needed <= 0:
            return True
        if num_needed > self.num_free_blocks:
            return False
        request.block_ids.extend(self._take(num_needed))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register request's full, computed blocks in the prefix cache (after a step ran).

        Called only once the runner has written them, so a failed step never publishes a
        block. A block whose chain is already cached elsewhere (two requests computed the
        same prefix at once) stays private and is recycled uncached when freed.
        """
        chain = self._chains.get(request.request_id)
        if chain is None:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= chain.num_registered:
            return
        extend_chain(chain.hashes, chain.root, request.all_token_ids, self.block_size, num_full)
        for index in range(chain.num_registered, num_full):
            block, block_hash = request.block_ids[index], chain.hashes[index]
            if self._block_hash[block] is None and block_hash not in self._cached:
                self._cached[block_hash] = block
                self._block_hash[block] = block_hash
        chain.num_registered = num_full

    def free(self, request: Request) -> None:
        """Drop request's hold on its blocks (a no-op when it holds none).

        Blocks nobody holds any more return to the pool: cached ones to the evictable LRU
        (tail blocks first, so a chain is evicted from its end and its shared start stays),
        the others to the uncached free list.
        """
        blocks, request.block_ids = request.block_ids, []
        self._chains.pop(request.request_id, None)
        for block in reversed(blocks):
            assert self._ref_counts[block] > 0, f"block {block} freed twice"
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._block_hash[block] is not None:
                    self._evictable[block] = None
                else:
                    self._free_uncached.append(block)

    # ------------------------------------------------------------------ internals

    def _take(self, num_blocks: int) -> list[int]:
        """num_blocks fresh blocks (ref count 1): uncached first, then evict LRU cached ones."""
        taken: list[int] = []
        for _ in range(num_blocks):
            if self._free_uncached:
                block = self._free_uncached.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                self._uncache(block)
            assert self._ref_counts[block] == 0, f"block {block} taken while held"
            self._ref_counts[block] = 1
            taken.append(block)
        return taken

    def _uncache(self, block: int) -> None:
        block_hash = self._block_hash[block]
        if block_hash is not None:
            self._block_hash[block] = None
            if self._cached.get(block_hash) == block:
                del self._cached[block_hash]

    def check_invariants(self, holders: list[Request]) -> None:
        """Test aid: ref counts equal holders, the pools partition the unheld blocks."""
        counts = [0] * self.num_blocks
        for request in holders:
            for block in request.block_ids:
                counts[block] += 1
        assert counts == self._ref_counts, "a block's ref count differs from its holders"
        free = list(self._free_uncached) + list(self._evictable)
        assert len(free) == len(set(free)), "a block is free twice"
        assert set(free) == {b for b in range(self.num_blocks) if counts[b] == 0}, "leak"
        assert all(self._block_hash[b] is None for b in self._free_uncached)
        assert all(self._block_hash[b] is not None for b in self._evictable)
        for block_hash, block in self._cached.items():
            assert self._block_hash[block] == block_hash
