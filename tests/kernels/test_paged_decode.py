"""Decode attention reading the paged KV cache in place (loramux_kernels/cpu/paged_decode.c) against
the dense reference: GQA group sizes, head sizes, block sizes, windows, soft-capping, fp32
(exact-ish) and bf16 (measured tolerance), batch invariance, and the CPU backend against
the torch backend over mixed prefill + decode steps."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels.attention.backend import AttentionLayer, select_attention_backend
from loramux.kernels.attention.cpu_paged import CpuPagedAttention, paged_decode
from loramux.kernels.attention.torch_paged import TorchPagedAttention, build_paged_metadata
from tests.kernels.test_attention import dense_reference

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LAYERS = {
    "full": AttentionLayer(scale=0.2),
    "window": AttentionLayer(scale=0.2, window=7),
    "softcap": AttentionLayer(scale=0.3, softcap=2.0),
    "window+softcap": AttentionLayer(scale=0.3, window=4, softcap=1.5),
}


@pytest.fixture(scope="module")
def backend() -> CpuPagedAttention:
    return CpuPagedAttention.create()


def _paged_case(context_lens, heads, kv_heads, dim, block_size, dtype, seed=0):
    """Random caches holding each sequence's context in shuffled blocks, and its query."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    tables, used = [], 0
    for need in blocks_needed:
        tables.append(order[used : used + need])
        used += need
    q = torch.randn(len(context_lens), heads, dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables


def _context(cache, table, n):
    """[n, KVH, D]: positions 0..n-1 of one sequence, gathered (the reference's input)."""
    return torch.cat([cache[b] for b in table])[:n]


def _decode_metadata(context_lens, tables, block_size, max_blocks=None):
    width = max_blocks or max(len(t) for t in tables)
    block_tables = torch.zeros(len(tables), width, dtype=torch.int64)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    return (
        torch.arange(len(context_lens), dtype=torch.int64),
        block_tables,
        torch.tensor(context_lens, dtype=torch.int64),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize(
    "heads,kv_heads,dim,block_size",
    [(4, 4, 64, 16), (8, 2, 64, 16), (6, 1, 40, 4), (9, 3, 24, 5)],
    ids=["mha", "gqa4", "mqa-odd-dim", "gqa3-odd-block"],
)
def test_paged_decode_matches_the_dense_reference(backend, dtype, layer_name, heads, kv_heads, dim, block_size):
    layer = LAYERS[layer_name]
    context_lens = [1, 3, 16, 17, 40, 5]
    q, k_cache, v_cache, tables = _paged_case(context_lens, heads, kv_heads, dim, block_size, dtype)
    rows, block_tables, lens = _decode_metadata(context_lens, tables, block_size)
    out = torch.full_like(q, float("nan"))
    paged_decode(backend._library, out, q, k_cache, v_cache, rows, block_tables, lens, layer)
    for i, n in enumerate(context_lens):
        expected = dense_reference(
            q[i : i + 1].float(),
            _context(k_cache, tables[i], n).float(),
            _context(v_cache, tables[i], n).float(),
            torch.tensor([n - 1]),
            layer,
        )
        torch.testing.assert_close(out[i].float().reshape(1, -1), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_decode_is_the_same_alone_or_in_a_batch(backend, dtype):
    """Batch-invariant and thread-count-invariant: bitwise the same result."""
    context_lens = [33, 7, 64, 2]
    q, k_cache, v_cache, tables = _paged_case(context_lens, 8, 2, 64, 16, dtype, seed=3)
    layer = LAYERS["full"]
    rows, block_tables, lens = _decode_metadata(context_lens, tables, 16)
    batched = torch.empty_like(q)
    paged_decode(backend._library, batched, q, k_cache, v_cache, rows, block_tables, lens, layer, num_threads=2)
    for i in range(len(context_lens)):
        alone = torch.empty_like(q[:1])
        paged_decode(
            backend._library, alone, q[i : i + 1], k_cache, v_cache, rows[:1], block_tables[i : i + 1],
            lens[i : i + 1], layer, num_threads=1,
        )  # fmt: skip
        assert torch.equal(alone[0], batched[i])


def test_only_the_decode_rows_are_written(backend):
    context_lens = [5, 9]
    q, k_cache, v_cache, tables = _paged_case(context_lens, 4, 2, 16, 4, torch.float32)
    q = torch.cat([torch.zeros(3, 4, 16), q])  # rows 0-2 belong to a prefill
    _, block_tables, lens = _decode_metadata(context_lens, tables, 4)
    rows = torch.tensor([3, 4])
    out = torch.full_like(q, -7.0)
    paged_decode(backend._library, out, q, k_cache, v_cache, rows, block_tables, lens, LAYERS["full"])
    assert torch.all(out[:3] == -7.0) and not torch.any(out[3:] == -7.0)


def test_refuses_mismatched_dtypes_and_layouts(backend):
    q, k_cache, v_cache, tables = _paged_case([4], 4, 2, 16, 4, torch.float32)
    rows, block_tables, lens = _decode_metadata([4], tables, 4)
    with pytest.raises(ValueError, match="k_cache"):
        paged_decode(backend._library, q.clone(), q, k_cache.bfloat16(), v_cache, rows, block_tables, lens, LAYERS["full"])
    with pytest.raises(ValueError, match="int64"):
        paged_decode(backend._library, q.clone(), q, k_cache, v_cache, rows.int(), block_tables, lens, LAYERS["full"])
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        paged_decode(backend._library, q.half(), q.half(), k_cache.half(), v_cache.half(), rows, block_tables, lens,
                     LAYERS["full"])  # fmt: skip


def test_decode_metadata_without_gather_carries_block_tables():
    meta = build_paged_metadata([0, 20, 5], [6, 1, 1], [[3, 4], [0, 1], [2]], 16, [], torch.device("cpu"), False)
    assert meta.decode.gather is None and meta.decode.masks is None
    assert meta.decode.rows.tolist() == [6, 7]
    assert meta.decode.context_lens.tolist() == [21, 6]
    assert meta.decode.block_tables.tolist() == [[0, 1], [2, 0]]
    with_gather = build_paged_metadata([0, 20, 5], [6, 1, 1], [[3, 4], [0, 1], [2]], 16, [], torch.device("cpu"))
    assert with_gather.decode.gather.shape == (2, 21)
    assert torch.equal(with_gather.slot_mapping, meta.slot_mapping)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_cpu_backend_matches_the_torch_backend_over_mixed_steps(backend, dtype, layer_name):
    """Prefill chunks, later chunks and decodes in one batch: both backends write the same
    cache and produce the same outputs (prefill: same SDPA path; decode: the kernel)."""
    layer = LAYERS[layer_name]
    torch.manual_seed(0)
    heads, kv_heads, dim, block = 8, 2, 32, 4
    lengths = [23, 9, 14]
    tables = [[5, 1, 7, 2, 11, 12], [0, 3, 6], [8, 9, 10, 4]]
    seq = [(torch.randn(n, heads, dim), torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)) for n in lengths]
    steps = [[(0, 12), (0, 5), (0, 13)], [(12, 9), (5, 1), (13, 1)], [(21, 1), (6, 2), None], [(22, 1), (8, 1), None]]
    caches = {name: (torch.zeros(16, block, kv_heads, dim, dtype=dtype), torch.zeros(16, block, kv_heads, dim,
                                                                                     dtype=dtype))
              for name in ("cpu", "torch")}  # fmt: skip
    windows = [layer.window] if layer.window else []
    for step in steps:
        live = [(i, s, n) for i, part in enumerate(step) if part is not None for s, n in [part]]
        q = torch.cat([seq[i][0][s : s + n] for i, s, n in live]).to(dtype)
        k = torch.cat([seq[i][1][s : s + n] for i, s, n in live]).to(dtype)
        v = torch.cat([seq[i][2][s : s + n] for i, s, n in live]).to(dtype)
        outs = {}
        for name, impl in (("cpu", backend), ("torch", TorchPagedAttention())):
            meta = impl.build_metadata(
                [s for _, s, _ in live], [n for _, _, n in live], [tables[i] for i, _, _ in live], block, windows,
                torch.device("cpu"),
            )  # fmt: skip
            outs[name] = impl.forward(q, k, v, *caches[name], meta, layer)
        assert torch.equal(caches["cpu"][0], caches["torch"][0]) and torch.equal(caches["cpu"][1], caches["torch"][1])
        torch.testing.assert_close(outs["cpu"].float(), outs["torch"].float(), **TOLERANCE[dtype])


def test_wide_groups_fall_back_to_the_torch_decode(backend):
    """64 query heads per KV head is past the kernel's table: the torch path serves it."""
    context_lens = [6, 11]
    q, k_cache, v_cache, tables = _paged_case(context_lens, 64, 1, 8, 4, torch.float32)
    meta = backend.build_metadata([n - 1 for n in context_lens], [1, 1], tables, 4, [], torch.device("cpu"))
    k_new = torch.stack([k_cache[t[(n - 1) // 4], (n - 1) % 4] for t, n in zip(tables, context_lens)])
    v_new = torch.stack([v_cache[t[(n - 1) // 4], (n - 1) % 4] for t, n in zip(tables, context_lens)])
    out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, LAYERS["window"])
    for i, n in enumerate(context_lens):
        expected = dense_reference(
            q[i : i + 1], _context(k_cache, tables[i], n), _context(v_cache, tables[i], n), torch.tensor([n - 1]),
            LAYERS["window"],
        )  # fmt: skip
        torch.testing.assert_close(out[i : i + 1], expected, **TOLERANCE[torch.float32])


def test_auto_selects_the_paged_kernel_on_the_cpu():
    assert select_attention_backend(torch.device("cpu")).name == "cpu"
    assert select_attention_backend(torch.device("cpu"), "torch").name == "torch"
    with pytest.raises(ValueError, match="unknown attention backend"):
        select_attention_backend(torch.device("cpu"), "flash")
