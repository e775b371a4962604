"""The backend-agnostic pieces of DoRA and embedding LoRA against their plain-loop semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramux.kernels.buffers import LoraModuleBuffers, dora_factor
from loramux.kernels.dora import apply_dora, step_uses_dora
from loramux.kernels.embedding_lora import add_embedding_lora
from loramux.kernels.metadata import build_lora_batch_info
from loramux.kernels.reference import add_lora_reference, apply_dora_per_token
from tests.kernels.layouts import LAYOUTS, NUM_SLOTS, segment_layout

DORA_SLOTS = (0, 3, 5)  # the other slots hold plain LoRA


def _buffers(in_features: int, out_features: int, rank: int, gen: torch.Generator) -> LoraModuleBuffers:
    buffers = LoraModuleBuffers(NUM_SLOTS, rank, in_features, out_features, torch.float32, "cpu")
    buffers.base_weight = torch.randn(out_features, in_features, generator=gen)
    for slot in range(NUM_SLOTS):
        r = 1 + slot % rank
        a, b = torch.randn(r, in_features, generator=gen), torch.randn(out_features, r, generator=gen)
        magnitude = torch.rand(out_features, generator=gen) + 0.5 if slot in DORA_SLOTS else None
        buffers.write(slot, a, b, 0.5, magnitude)
    return buffers


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_dora_matches_per_token(layout, with_bias):
    gen = torch.Generator().manual_seed(3)
    slices = (_buffers(24, 16, 4, gen), _buffers(24, 8, 4, gen))  # a fused projection, two slices
    seqs = segment_layout(layout, 12, seed=4)
    info = build_lora_batch_info([s for s, _ in seqs], [n for _, n in seqs])
    token_slots = info.token_slots.tolist()
    y = torch.randn(info.num_tokens, 24, generator=gen)
    bias = torch.randn(24, generator=gen) if with_bias else None
    expected = y.clone()
    apply_dora_per_token(expected, bias, slices, token_slots)
    apply_dora(y, bias, slices, info)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    # The host-side skip: only steps with a DoRA slot pay for the gather.
    assert step_uses_dora(slices, info) == any(s in DORA_SLOTS for s in info.slot_indices_host)


def test_dora_factor_is_peft_weight_norm():
    gen = torch.Generator().manual_seed(5)
    weight, a, b = torch.randn(6, 10, generator=gen), torch.randn(3, 10, generator=gen), torch.randn(6, 3, generator=gen)
    magnitude = torch.rand(6, generator=gen)
    expected = magnitude / torch.linalg.norm(weight + 0.25 * (b @ a), dim=1)
    torch.testing.assert_close(dora_factor(magnitude, weight, a, b, 0.25), expected)


def test_plain_writes_and_clears_reset_the_factor():
    gen = torch.Generator().manual_seed(6)
    buffers = _buffers(8, 4, 2, gen)
    assert buffers.num_dora_slots == len(DORA_SLOTS)
    buffers.clear(0)
    buffers.write(3, torch.randn(2, 8, generator=gen), torch.randn(4, 2, generator=gen), 1.0)
    assert buffers.num_dora_slots == 1 and buffers.dora_host == [i == 5 for i in range(NUM_SLOTS)]
    assert torch.equal(buffers.dora_scale[[0, 3, NUM_SLOTS]], torch.ones(3, 4))
    no_base = LoraModuleBuffers(2, 2, 8, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="no base weight"):
        no_base.write(0, torch.randn(2, 8), torch.randn(4, 2), 1.0, torch.ones(4))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_embedding_lora_is_linear_lora_on_one_hot_rows(layout):
    """Semantics: the embedding's delta is a linear LoRA (in = vocab) of each token's one-hot row."""
    gen = torch.Generator().manual_seed(7)
    vocab, hidden = 40, 12
    buffers = LoraModuleBuffers(NUM_SLOTS, 4, vocab, hidden, torch.float32, "cpu")
    for slot in range(1, NUM_SLOTS):  # slot 0 does not adapt the embedding
        r = 1 + slot % 4
        buffers.write(slot, torch.randn(r, vocab, generator=gen), torch.randn(hidden, r, generator=gen), 0.75)
    seqs = segment_layout(layout, 11, seed=8)
    info = build_lora_batch_info([s for s, _ in seqs], [n for _, n in seqs], [1.0 + 0.5 * (s % 2) for s, _ in seqs])
    ids = torch.randint(vocab, (info.num_tokens,), generator=gen)
    y = torch.randn(info.num_tokens, hidden, generator=gen)
    expected = y.clone()
    add_lora_reference(expected, F.one_hot(ids, vocab).float(), [buffers], info)
    add_embedding_lora(y, ids, buffers, info)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
