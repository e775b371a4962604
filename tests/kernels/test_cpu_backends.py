"""The torch and CPU (C kernel) LoRA backends against the reference semantics."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels.backend import select_backend
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.cpu_backend import LONG_SEGMENT_TOKENS
from loramux.kernels.metadata import build_lora_batch_info
from loramux.kernels.reference import add_lora_per_token, add_lora_reference
from tests.kernels.layouts import LAYOUTS, NUM_SLOTS, segment_layout

RANKS = (1, 8, 16, 64)


def make_buffers(in_features, out_features, max_rank, ranks, seed=0):
    """Stacked buffers with a different rank per slot (0 = slot does not adapt the module)."""
    gen = torch.Generator().manual_seed(seed)
    buffers = LoraModuleBuffers(NUM_SLOTS, max_rank, in_features, out_features, torch.float32, "cpu")
    for slot, rank in enumerate(ranks):
        if rank:
            a = torch.randn(rank, in_features, generator=gen) * 0.1
            b = torch.randn(out_features, rank, generator=gen) * 0.1
            buffers.write(slot, a, b, scaling=0.5 + slot)
    return buffers


def mixed_ranks(max_rank: int) -> list[int]:
    """Mixed ranks up to max_rank, including a slot that does not adapt the module."""
    return [max_rank, 1, max(1, max_rank // 2), 0, max_rank, max(1, max_rank // 4)]


def make_case(layout, num_tokens, in_features, widths, max_rank, seed=0):
    seqs = segment_layout(layout, num_tokens, seed)
    info = build_lora_batch_info([s for s, _ in seqs], [n for _, n in seqs])
    slices = [make_buffers(in_features, w, max_rank, mixed_ranks(max_rank), seed + k) for k, w in enumerate(widths)]
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(info.num_tokens, in_features, generator=gen)
    y = torch.randn(info.num_tokens, sum(widths), generator=gen)
    return info, slices, x, y


@pytest.fixture(scope="module", params=["torch", "cpu"])
def backend(request, tmp_path_factory):
    chosen = select_backend(torch.device("cpu"), torch.float32, tmp_path_factory.mktemp("kcache"), request.param)
    assert chosen.name == request.param, "the C kernel did not build; see loramux_kernels/cpu_build.py"
    return chosen


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("max_rank", RANKS)
def test_backend_matches_reference(backend, layout, max_rank):
    num_tokens = 2 * LONG_SEGMENT_TOKENS + 5  # long and short segments both occur
    info, slices, x, y = make_case(layout, num_tokens, 200, [576], max_rank)
    expected = y.clone()
    add_lora_reference(expected, x, slices, info)
    backend.prepare(info)
    backend.add_lora(y, x, slices, info)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("in_features,widths", [(576, [576, 192, 192]), (1536, [576]), (200, [1536, 1536])])
@pytest.mark.parametrize("layout", ["distinct", "zipf", "skewed"])
def test_backend_fused_slices(backend, in_features, widths, layout):
    """One call serves a fused projection (qkv with GQA widths, gate_up)."""
    info, slices, x, y = make_case(layout, 24, in_features, widths, 16, seed=3)
    expected = y.clone()
    add_lora_reference(expected, x, slices, info)
    backend.prepare(info)
    backend.add_lora(y, x, slices, info)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_output_column_slice_view(backend):
    """y may be a column slice of a wider tensor (row stride > width)."""
    info, slices, x, _ = make_case("zipf", 9, 64, [48], 8)
    wide = torch.randn(info.num_tokens, 100)
    expected = wide.clone()
    add_lora_reference(expected[:, 20:68], x, slices, info)
    backend.prepare(info)
    backend.add_lora(wide[:, 20:68], x, slices, info)
    torch.testing.assert_close(wide, expected, atol=1e-4, rtol=1e-4)


def test_segment_scales(backend):
    """A per-request scale splits segments and multiplies that request's delta."""
    slices = [make_buffers(32, 40, 8, mixed_ranks(8))]
    info = build_lora_batch_info([0, 0, 2], [2, 1, 3], seq_scales=[1.0, 0.25, 2.0])
    assert info.num_segments == 3
    x, y = torch.randn(6, 32), torch.randn(6, 40)
    expected = y.clone()
    add_lora_per_token(expected, x, slices, [0, 0, 0, 2, 2, 2], [1.0, 1.0, 0.25, 2.0, 2.0, 2.0])
    backend.prepare(info)
    backend.add_lora(y, x, slices, info)
    torch.testing.assert_close(y, expected, atol=1e-4, rtol=1e-4)


def test_result_is_batch_invariant(backend):
    """A token's delta does not depend on the other tokens of the batch (bitwise)."""
    slices = [make_buffers(576, 576, 32, mixed_ranks(32))]
    x = torch.randn(7, 576)
    alone_info = build_lora_batch_info([4], [1])
    alone = torch.zeros(1, 576)
    backend.prepare(alone_info)
    backend.add_lora(alone, x[3:4], slices, alone_info)
    batch_info = build_lora_batch_info([0, 1, 4, 5], [2, 1, 1, 3])
    batched = torch.zeros(7, 576)
    backend.prepare(batch_info)
    backend.add_lora(batched, x, slices, batch_info)
    assert torch.equal(batched[3], alone[0])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_matches_per_token_loop(layout):
    info, slices, x, y = make_case(layout, 13, 40, [24, 8], 8)
    expected = y.clone()
    token_slots = info.token_slots.tolist()
    add_lora_per_token(expected, x, slices, token_slots, [1.0] * len(token_slots))
    add_lora_reference(y, x, slices, info)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_metadata_merges_runs():
    info = build_lora_batch_info([-1, 0, 0, 3, -1], [2, 1, 4, 0, 1])
    assert info.seg_indptr_host == (0, 2, 7, 7, 8)
    assert info.slot_indices_host == (-1, 0, 3, -1)
    assert info.token_slots.tolist() == [-1, -1, 0, 0, 0, 0, 0, -1]
    assert info.max_seg_len == 5
    assert info.has_adapters
    assert not build_lora_batch_info([-1], [3]).has_adapters


def test_add_lora_needs_prepare(backend):
    """The plan is explicit: add_lora on an info that prepare() did not see is refused."""
    info, slices, x, y = make_case("zipf", 9, 64, [48], 8)
    if backend.name == "torch":
        backend.add_lora(y, x, slices, info)  # plans nothing: any info is fine
        return
    with pytest.raises(RuntimeError, match="prepare"):
        backend.add_lora(y, x, slices, info)
    backend.prepare(info)
    backend.add_lora(y, x, slices, info)
