"""Content hashes of full KV blocks for prefix caching, chained and seeded by adapter.

The K/V of a token depend on every token before it and on the weights that projected it,
so a block is identified by the hash of its parent block and its own token ids, and the
chain starts from a root seeded with the adapter id and version (vLLM v1's
`hash_block_tokens` with extra keys). Two adapters, or two versions of one adapter, never
produce the same chain for the same tokens. SHA-256 so that a client cannot craft a
collision that would read another tenant's cache.
"""

from __future__ import annotations

import hashlib
import json
from array import array

BlockHash = bytes  # 32-byte SHA-256 digest


def root_hash(adapter_id: str | None, adapter_version: int | None, adapter_scale: float = 1.0) -> BlockHash:
    """The chain's seed: base (None, None) or one adapter version at one strength (a
    request's adapter_scale changes every K/V it projects)."""
    parts: list = ["loramux-kv-v1", adapter_id, adapter_version]
    if adapter_scale != 1.0:
        parts.append(float(adapter_scale))
    key = json.dumps(parts)
    return hashlib.sha256(key.encode()).digest()


def hash_block_tokens(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    """Hash of one full block: H(parent || its token ids as int64)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def extend_chain(
    chain: list[BlockHash], root: BlockHash, token_ids: list[int], block_size: int, num_blocks: int
) -> None:
    """Append hashes to `chain` (hashes of blocks 0..len-1) until it covers num_blocks blocks."""
    assert num_blocks * block_size <= len(token_ids), (num_blocks, len(token_ids))
    parent = chain[-1] if chain else root
    for index in range(len(chain), num_blocks):
        parent = hash_block_tokens(parent, token_ids[index * block_size : (index + 1) * block_size])
        chain.append(parent)
