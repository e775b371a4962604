"""Attention over a paged KV cache for a flat batch of prefill chunks and decodes (torch).

The KV cache of one layer is [num_blocks, block_size, num_kv_heads, head_dim]; token
position p of a sequence lives at flat index block_ids[p // block_size] * block_size +
p % block_size. Decodes (one new token each) run as one padded batch; prefill chunks run
one sequence at a time (they are long, so the call overhead does not matter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodeGroup:
    rows: torch.Tensor  # int64 [num_decodes]: rows of the flat batch
    gather: torch.Tensor  # int64 [num_decodes, max_ctx]: flat cache index of each context position
    mask: torch.Tensor  # bool [num_decodes, 1, 1, max_ctx]: True = a real context position


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    end: int
    # int64 [context_len]: flat cache indices of positions 0..context_len-1 when earlier
    # tokens are cached (a later chunk); None when the chunk starts at position 0.
    gather: torch.Tensor | None
    mask: torch.Tensor | None  # bool [num_tokens, context_len], causal over the context


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]: where each new token's K/V is written
    decode: DecodeGroup | None
    prefills: tuple[PrefillChunk, ...]


def _flat_indices(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache index of each position: block_table[p // block_size] * block_size + p % block_size."""
    return block_table[..., positions // block_size] * block_size + positions % block_size


def build_attention_metadata(
    seq_starts: list[int],  # per sequence: position of its first token in this step
    seq_num_tokens: list[int],  # per sequence: tokens in this step
    seq_block_ids: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    slot_chunks: list[torch.Tensor] = []
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    prefills: list[PrefillChunk] = []
    row = 0
    for seq, (start, n, blocks) in enumerate(zip(seq_starts, seq_num_tokens, seq_block_ids)):
        end_position = start + n
        table = torch.tensor(blocks, dtype=torch.int64)
        slot_chunks.append(_flat_indices(table, torch.arange(start, end_position), block_size))
        if n == 1:
            decode_rows.append(row)
            decode_seqs.append(seq)
        elif start == 0:
            prefills.append(PrefillChunk(row, row + n, None, None))
        else:
            context = torch.arange(end_position)
            mask = context[None, :] <= torch.arange(start, end_position)[:, None]
            gather = _flat_indices(table, context, block_size)
            prefills.append(PrefillChunk(row, row + n, gather.to(device), mask.to(device)))
        row += n
    decode = None
    if decode_rows:
        context_lens = torch.tensor([seq_starts[s] + 1 for s in decode_seqs])  # [B]
        max_ctx = int(context_lens.max())
        max_blocks = max(len(seq_block_ids[s]) for s in decode_seqs)
        tables = torch.zeros(len(decode_seqs), max_blocks, dtype=torch.int64)  # [B, max_blocks]
        for i, s in enumerate(decode_seqs):
            tables[i, : len(seq_block_ids[s])] = torch.tensor(seq_block_ids[s], dtype=torch.int64)
        positions = torch.arange(max_ctx)
        real = positions[None, :] < context_lens[:, None]  # [B, max_ctx]
        # Padding positions read block 0 and are masked out.
        gather = torch.where(real, _flat_indices(tables, positions, block_size), 0)
        decode = DecodeGroup(
            rows=torch.tensor(decode_rows, dtype=torch.int64, device=device),
            gather=gather.to(device),
            mask=real[:, None, None, :].to(device),
        )
    return AttentionMetadata(
        slot_mapping=torch.cat(slot_chunks).to(device),
        decode=decode,
        prefills=tuple(prefills),
    )


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotary applied
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotary applied
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    flat_k = k_cache.view(-1, kv_heads, head_dim)
    flat_v = v_cache.view(-1, kv_heads, head_dim)
    flat_k.index_copy_(0, meta.slot_mapping, k)
    flat_v.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = kv_heads != num_heads
    if meta.decode is not None:
        group = meta.decode
        q_d = q.index_select(0, group.rows).unsqueeze(2)  # [B, H, 1, D]
        k_d = flat_k[group.gather].transpose(1, 2)  # [B, KVH, max_ctx, D]
        v_d = flat_v[group.gather].transpose(1, 2)
        o_d = F.scaled_dot_product_attention(
            q_d, k_d, v_d, attn_mask=group.mask, scale=scale, enable_gqa=gqa
        )  # [B, H, 1, D]
        out.index_copy_(0, group.rows, o_d.squeeze(2))
    for chunk in meta.prefills:
        q_p = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if chunk.gather is None:
            k_p = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, D]
            v_p = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            o_p = F.scaled_dot_product_attention(q_p, k_p, v_p, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            k_p = flat_k[chunk.gather].transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
            v_p = flat_v[chunk.gather].transpose(0, 1).unsqueeze(0)
            o_p = F.scaled_dot_product_attention(
                q_p, k_p, v_p, attn_mask=chunk.mask, scale=scale, enable_gqa=gqa
            )
        out[chunk.start : chunk.end] = o_p[0].transpose(0, 1)
    return out.view(num_tokens, num_heads * head_dim)
