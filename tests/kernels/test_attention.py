"""The torch paged-attention backend against a dense reference: windows, soft-capping, GQA."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels.attention.backend import AttentionLayer, select_attention_backend


def dense_reference(q, k, v, positions, layer: AttentionLayer):
    """q: [n, H, D] for query positions `positions` of one sequence; k, v: [ctx, KVH, D]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q.double(), k.double()) * layer.scale
    if layer.softcap is not None:
        scores = torch.tanh(scores / layer.softcap) * layer.softcap
    context = torch.arange(k.shape[0])
    visible = context[None, :] <= positions[:, None]
    if layer.window is not None:
        visible &= context[None, :] > positions[:, None] - layer.window
    scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.einsum("hnc,chd->nhd", scores.softmax(-1), v.double())
    return out.reshape(q.shape[0], -1).float()


@pytest.mark.parametrize(
    "layer",
    [
        AttentionLayer(scale=0.25),
        AttentionLayer(scale=0.25, window=3),
        AttentionLayer(scale=0.3, softcap=2.0),
        AttentionLayer(scale=0.3, window=5, softcap=1.5),
    ],
    ids=["full", "window", "softcap", "window+softcap"],
)
def test_paged_steps_match_dense(layer):
    """Prefill, a later chunk and decodes of two sequences, all past the window."""
    torch.manual_seed(0)
    backend = select_attention_backend(torch.device("cpu"))
    heads, kv_heads, dim, block = 4, 2, 8, 4
    k_cache = torch.zeros(32, block, kv_heads, dim)
    v_cache = torch.zeros_like(k_cache)
    lengths = [11, 9]
    blocks = [[5, 1, 7, 2], [0, 3, 6]]
    seq_q = [torch.randn(n, heads, dim) for n in lengths]
    seq_k = [torch.randn(n, kv_heads, dim) for n in lengths]
    seq_v = [torch.randn(n, kv_heads, dim) for n in lengths]
    # Steps: (start, count) per sequence: a first chunk, a second chunk / decodes.
    steps = [[(0, 6), (0, 5)], [(6, 3), (5, 1)], [(9, 1), (6, 1)], [(10, 1), (7, 2)]]
    windows = sorted({w for w in (layer.window,) if w is not None})
    for step in steps:
        meta = backend.build_metadata([s for s, _ in step], [n for _, n in step], blocks, block, windows, torch.device("cpu"))
        q = torch.cat([seq_q[i][s : s + n] for i, (s, n) in enumerate(step)])
        k = torch.cat([seq_k[i][s : s + n] for i, (s, n) in enumerate(step)])
        v = torch.cat([seq_v[i][s : s + n] for i, (s, n) in enumerate(step)])
        out = backend.forward(q, k, v, k_cache, v_cache, meta, layer)
        row = 0
        for i, (s, n) in enumerate(step):
            expected = dense_reference(
                seq_q[i][s : s + n], seq_k[i][: s + n], seq_v[i][: s + n], torch.arange(s, s + n), layer
            )
            torch.testing.assert_close(out[row : row + n], expected, atol=1e-5, rtol=1e-5)
            row += n


def test_window_changes_the_result():
    """The window is not a no-op once a query reaches past it (the check above can fail)."""
    torch.manual_seed(1)
    q, k, v = torch.randn(8, 2, 4), torch.randn(8, 2, 4), torch.randn(8, 2, 4)
    positions = torch.arange(8)
    full = dense_reference(q, k, v, positions, AttentionLayer(scale=0.5))
    windowed = dense_reference(q, k, v, positions, AttentionLayer(scale=0.5, window=3))
    assert torch.equal(full[:3], windowed[:3]) and not torch.allclose(full[3:], windowed[3:])
