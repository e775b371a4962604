"""Paged attention in torch (any device): the reference backend and today's CPU/CUDA path.

The KV cache of one layer is [num_blocks, block_size, num_kv_heads, head_dim]; token
position p of a sequence lives at flat index block_ids[p // block_size] * block_size +
p % block_size. Decodes (one new token each) run as one padded batch; prefill chunks run
one sequence at a time (they are long, so the call overhead does not matter).

Semantics per query token at position i of a sequence (context positions j <= i):
    out_i = softmax_j(cap(scale * q_i . k_j) masked to i - window < j <= i) @ v
    cap(s) = softcap * tanh(s / softcap), or s when softcap is None
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from loramux.kernels.attention.backend import AttentionLayer
from loramux.kernels.staging import DeviceUpload


@dataclass(frozen=True)
class DecodeGroup:
    rows: torch.Tensor  # int64 [num_decodes]: rows of the flat batch
    context_lens: torch.Tensor  # int64 [num_decodes]: positions 0..len-1 (the query is the last)
    block_tables: torch.Tensor  # int64 [num_decodes, max_blocks]: KV blocks (padding: 0)
    # Only for the torch path (kernels that read the cache in place skip them):
    # int64 [num_decodes, max_ctx]: flat cache index of each context position
    gather: torch.Tensor | None = None
    # window (None = full) -> bool [num_decodes, 1, 1, max_ctx]: True = a visible context position
    masks: Mapping[int | None, torch.Tensor] | None = None


@dataclass(frozen=True)
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    end: int
    # int64 [context_len]: flat cache indices of positions 0..context_len-1 when earlier
    # tokens are cached (a later chunk); None when the chunk starts at position 0.
    gather: torch.Tensor | None
    # window (None = full) -> bool [num_tokens, context_len] visible positions, or None
    # where plain causal attention over the chunk is exact (is_causal, no mask)
    masks: Mapping[int | None, torch.Tensor | None]


@dataclass(frozen=True)
class PagedAttentionMetadata:
    slot_mapping: torch.Tensor  # int64 [num_tokens]: where each new token's K/V is written
    decode: DecodeGroup | None
    prefills: tuple[PrefillChunk, ...]


def _flat_indices(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache index of each position: block_table[p // block_size] * block_size + p % block_size."""
    return block_table[..., positions // block_size] * block_size + positions % block_size


def build_paged_metadata(
    seq_starts: Sequence[int],
    seq_num_tokens: Sequence[int],
    seq_block_ids: Sequence[Sequence[int]],
    block_size: int,
    windows: Sequence[int],
    device: torch.device,
    decode_gather: bool = True,
) -> PagedAttentionMetadata:
    """The step's metadata with a copy of its own (stage_paged_metadata shares the step's)."""
    upload = DeviceUpload(device)
    finish = stage_paged_metadata(seq_starts, seq_num_tokens, seq_block_ids, block_size, windows, upload, decode_gather)
    upload.send()
    return finish()


def stage_paged_metadata(
    seq_starts: Sequence[int],
    seq_num_tokens: Sequence[int],
    seq_block_ids: Sequence[Sequence[int]],
    block_size: int,
    windows: Sequence[int],
    upload: DeviceUpload,
    decode_gather: bool = True,
) -> Callable[[], PagedAttentionMetadata]:
    """Index tensors are computed on the host and staged in `upload` (the step's one copy);
    the returned function builds the metadata after `upload.send()`, masks on the device.

    decode_gather=False leaves out the decodes' per-position gather indices and masks
    (O(decodes x context) host work per step) for kernels that read the block tables."""
    host: list[torch.Tensor] = []  # int64 gather pieces of later prefill chunks
    slot_chunks: list[torch.Tensor] = []
    decode_rows: list[int] = []
    decode_seqs: list[int] = []
    prefill_specs: list[tuple[int, int, int, int]] = []  # (row start, row end, position start, gather piece or -1)
    row = 0
    for seq, (start, n, blocks) in enumerate(zip(seq_starts, seq_num_tokens, seq_block_ids)):
        end_position = start + n
        table = torch.tensor(blocks, dtype=torch.int64)
        slot_chunks.append(_flat_indices(table, torch.arange(start, end_position), block_size))
        if n == 1:
            decode_rows.append(row)
            decode_seqs.append(seq)
        elif start == 0:
            prefill_specs.append((row, row + n, 0, -1))
        else:
            prefill_specs.append((row, row + n, start, len(host) + 1))  # after the slot mapping
            host.append(_flat_indices(table, torch.arange(end_position), block_size))
        row += n
    pieces = [torch.cat(slot_chunks) if slot_chunks else torch.zeros(0, dtype=torch.int64), *host]
    max_ctx = 0
    if decode_rows:
        context_lens = torch.tensor([seq_starts[s] + 1 for s in decode_seqs])  # [B]
        max_ctx = int(context_lens.max())
        max_blocks = max(len(seq_block_ids[s]) for s in decode_seqs)
        tables = torch.zeros(len(decode_seqs), max_blocks, dtype=torch.int64)  # [B, max_blocks]
        for i, s in enumerate(decode_seqs):
            tables[i, : len(seq_block_ids[s])] = torch.tensor(seq_block_ids[s], dtype=torch.int64)
        pieces += [torch.tensor(decode_rows, dtype=torch.int64), context_lens, tables.flatten()]
        if decode_gather:
            positions = torch.arange(max_ctx)
            real = positions[None, :] < context_lens[:, None]  # [B, max_ctx]
            # Padding positions read block 0 and are masked out.
            pieces.append(torch.where(real, _flat_indices(tables, positions, block_size), 0).flatten())
    handles = [upload.add(p) for p in pieces]
    return functools.partial(
        _finish_paged_metadata, upload, handles, decode_rows, max_ctx, prefill_specs, windows, decode_gather
    )


def _finish_paged_metadata(
    upload: DeviceUpload,
    handles: list[int],
    decode_rows: list[int],
    max_ctx: int,
    prefill_specs: list[tuple[int, int, int, int]],
    windows: Sequence[int],
    decode_gather: bool,
) -> PagedAttentionMetadata:
    device = upload.device
    on_device = [upload.get(h) for h in handles]
    decode = None
    if decode_rows:
        num_decodes = len(decode_rows)
        first = len(on_device) - (4 if decode_gather else 3)
        rows, context_lens, tables = on_device[first : first + 3]
        decode = DecodeGroup(rows=rows, context_lens=context_lens, block_tables=tables.view(num_decodes, -1))
        if decode_gather:
            positions = torch.arange(max_ctx, device=device)[None, :]  # [1, max_ctx]
            full = positions < context_lens[:, None]  # [B, max_ctx]
            masks: dict[int | None, torch.Tensor] = {None: full[:, None, None, :]}
            for window in windows:
                # Query position p = context_len - 1 sees p - window < j.
                visible = full if window >= max_ctx else full & (positions > context_lens[:, None] - 1 - window)
                masks[window] = visible[:, None, None, :]
            decode = replace(decode, gather=on_device[-1].view(num_decodes, max_ctx), masks=masks)

    prefills = []
    for row_start, row_end, start, piece in prefill_specs:
        n = row_end - row_start
        queries = torch.arange(start, start + n, device=device)[:, None]  # [n, 1]
        context = torch.arange(start + n, device=device)[None, :]  # [1, ctx]
        causal = context <= queries  # [n, ctx]
        chunk_masks: dict[int | None, torch.Tensor | None] = {None: causal if piece >= 0 else None}
        for window in windows:
            if start + n <= window:  # no query reaches past its window
                chunk_masks[window] = chunk_masks[None]
            else:
                chunk_masks[window] = causal & (context > queries - window)
        gather = on_device[piece] if piece >= 0 else None
        prefills.append(PrefillChunk(row_start, row_end, gather, chunk_masks))
    return PagedAttentionMetadata(slot_mapping=on_device[0], decode=decode, prefills=tuple(prefills))


def _attend(
    q: torch.Tensor,  # [B, H, n, D]
    k: torch.Tensor,  # [B, KVH, ctx, D]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # bool, broadcastable to [B, H, n, ctx]; None = causal
    layer: AttentionLayer,
) -> torch.Tensor:  # [B, H, n, D]
    gqa = k.shape[1] != q.shape[1]
    if layer.softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=layer.scale, enable_gqa=gqa
        )
    # Soft-capping sits between the scores and the softmax, which SDPA does not expose.
    if gqa:
        repeat = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scale  # [B, H, n, ctx]
    scores = torch.tanh(scores / layer.softcap) * layer.softcap
    if mask is None:
        n, ctx = scores.shape[-2:]
        mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class TorchPagedAttention:
    """Decodes gather their context out of the cache into one padded batch for SDPA.
    Subclasses with a paged decode kernel set `decode_gather = False` and override
    `_decode`; the cache writes and the prefill path are shared."""

    name = "torch"
    decode_gather = True

    def build_metadata(self, seq_starts, seq_num_tokens, seq_block_ids, block_size, windows, device):
        return build_paged_metadata(
            seq_starts, seq_num_tokens, seq_block_ids, block_size, windows, device, self.decode_gather
        )

    def stage_metadata(self, seq_starts, seq_num_tokens, seq_block_ids, block_size, windows, upload):
        return stage_paged_metadata(
            seq_starts, seq_num_tokens, seq_block_ids, block_size, windows, upload, self.decode_gather
        )

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotary applied
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotary applied
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: PagedAttentionMetadata,
        layer: AttentionLayer,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        num_tokens, num_heads, head_dim = q.shape
        kv_heads = k.shape[1]
        flat_k = k_cache.view(-1, kv_heads, head_dim)
        flat_v = v_cache.view(-1, kv_heads, head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if meta.decode is not None:
            self._decode(out, q, k_cache, v_cache, meta.decode, layer)
        for chunk in meta.prefills:
            q_p = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if chunk.gather is None:
                k_p = k[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)  # [1, KVH, n, D]
                v_p = v[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
            else:
                k_p = flat_k[chunk.gather].transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
                v_p = flat_v[chunk.gather].transpose(0, 1).unsqueeze(0)
            o_p = _attend(q_p, k_p, v_p, chunk.masks[layer.window], layer)
            out[chunk.start : chunk.end] = o_p[0].transpose(0, 1)
        return out.view(num_tokens, num_heads * head_dim)

    def _decode(
        self,
        out: torch.Tensor,  # [num_tokens, num_heads, head_dim]: the decode rows are written
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], this step's K written
        v_cache: torch.Tensor,
        group: DecodeGroup,
        layer: AttentionLayer,
    ) -> None:
        kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        flat_k = k_cache.view(-1, kv_heads, head_dim)
        flat_v = v_cache.view(-1, kv_heads, head_dim)
        q_d = q.index_select(0, group.rows).unsqueeze(2)  # [B, H, 1, D]
        k_d = flat_k[group.gather].transpose(1, 2)  # [B, KVH, max_ctx, D]
        v_d = flat_v[group.gather].transpose(1, 2)
        o_d = _attend(q_d, k_d, v_d, group.masks[layer.window], layer)  # [B, H, 1, D]
        out.index_copy_(0, group.rows, o_d.squeeze(2))
