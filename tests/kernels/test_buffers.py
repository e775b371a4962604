"""LoraModuleBuffers: any sequence of writes and clears leaves each slot exactly as a write
into fresh zeroed buffers would (the write only zeroes what the previous occupant used).
LoraModuleStack: its layers are views of it, and a stacked write equals per-layer writes."""

from __future__ import annotations

import random

import pytest
import torch

from loramux.kernels.buffers import LoraModuleBuffers, LoraModuleStack

SLOTS, MAX_RANK, IN, OUT = 3, 8, 40, 24
LAYERS = 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_writes_and_clears_in_any_order_match_fresh_writes(dtype):
    buffers = LoraModuleBuffers(SLOTS, MAX_RANK, IN, OUT, dtype, "cpu")
    rng = random.Random(0)
    for step in range(200):
        slot = rng.randrange(SLOTS)
        if rng.random() < 0.2:
            buffers.clear(slot)
            expected_a = torch.zeros(MAX_RANK, IN, dtype=dtype)
            expected_b = torch.zeros(MAX_RANK, OUT, dtype=dtype)
            rank = 0
        else:
            rank, scaling = rng.randint(1, MAX_RANK), rng.uniform(0.1, 4.0)
            source_dtype = dtype if rng.random() < 0.7 else torch.float32  # also converting
            lora_a = torch.randn(rank, IN, dtype=source_dtype)
            lora_b = torch.randn(OUT, rank, dtype=source_dtype)
            buffers.write(slot, lora_a, lora_b, scaling)
            expected_a = torch.zeros(MAX_RANK, IN, dtype=dtype)
            expected_b = torch.zeros(MAX_RANK, OUT, dtype=dtype)
            expected_a[:rank] = lora_a
            expected_b[:rank] = lora_b.t() * scaling
        assert torch.equal(buffers.lora_a[slot], expected_a), step
        assert torch.equal(buffers.lora_b[slot], expected_b), step
        assert buffers.ranks_host[slot] == int(buffers.ranks[slot]) == rank, step


def test_write_refuses_wrong_shapes_and_ranks():
    buffers = LoraModuleBuffers(SLOTS, MAX_RANK, IN, OUT, torch.float32, "cpu")
    with pytest.raises(ValueError, match="do not fit"):
        buffers.write(0, torch.zeros(4, IN), torch.zeros(4, OUT), 1.0)  # B not transposed
    with pytest.raises(ValueError, match="exceeds"):
        buffers.write(0, torch.zeros(MAX_RANK + 1, IN), torch.zeros(OUT, MAX_RANK + 1), 1.0)


@pytest.mark.parametrize(
    "dtype, source_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_stacked_writes_equal_per_layer_writes(dtype, source_dtype):
    stack = LoraModuleStack(LAYERS, SLOTS, MAX_RANK, IN, OUT, dtype, "cpu")
    plain = [LoraModuleBuffers(SLOTS, MAX_RANK, IN, OUT, dtype, "cpu") for _ in range(LAYERS)]
    for i, layer in enumerate(stack.layers):  # views of the stack, as the kernels read them
        assert layer.stack is stack and layer.lora_a.is_contiguous() and layer.lora_b.is_contiguous()
        assert layer.lora_a.data_ptr() == stack.lora_a[i].data_ptr()
        assert layer.ranks.data_ptr() == stack.ranks[i].data_ptr()
    rng = random.Random(1)
    for step in range(60):
        slot = rng.randrange(SLOTS)
        if rng.random() < 0.3:  # a per-layer write or clear in between (mixed-rank adapters)
            i = rng.randrange(LAYERS)
            if rng.random() < 0.5:
                for buffers in (stack.layers[i], plain[i]):
                    buffers.clear(slot)
            else:
                rank = rng.randint(1, MAX_RANK)
                lora_a, lora_b = torch.randn(rank, IN, dtype=source_dtype), torch.randn(OUT, rank, dtype=source_dtype)
                for buffers in (stack.layers[i], plain[i]):
                    buffers.write(slot, lora_a, lora_b, 0.75)
        else:
            rank = rng.randint(1, MAX_RANK)
            lora_a = torch.randn(LAYERS, rank, IN, dtype=source_dtype)
            lora_b = torch.randn(LAYERS, OUT, rank, dtype=source_dtype)
            scalings = tuple(rng.uniform(0.1, 4.0) for _ in range(LAYERS))
            stack.write(slot, lora_a, lora_b, scalings)
            for i, buffers in enumerate(plain):
                buffers.write(slot, lora_a[i], lora_b[i], scalings[i])
        for i, buffers in enumerate(plain):
            assert torch.equal(stack.lora_a[i], buffers.lora_a), step
            assert torch.equal(stack.lora_b[i], buffers.lora_b), step
            assert torch.equal(stack.ranks[i], buffers.ranks), step
            assert stack.layers[i].ranks_host == buffers.ranks_host, step


def test_stacked_write_refuses_wrong_shapes():
    stack = LoraModuleStack(LAYERS, SLOTS, MAX_RANK, IN, OUT, torch.float32, "cpu")
    lora_a, lora_b = torch.zeros(LAYERS, 4, IN), torch.zeros(LAYERS, OUT, 4)
    with pytest.raises(ValueError, match="do not fit"):
        stack.write(0, lora_a, lora_b.transpose(1, 2), (1.0,) * LAYERS)
    with pytest.raises(ValueError, match="do not fit"):
        stack.write(0, lora_a, lora_b, (1.0,) * (LAYERS - 1))
    with pytest.raises(ValueError, match="exceeds"):
        stack.write(0, torch.zeros(LAYERS, MAX_RANK + 1, IN), torch.zeros(LAYERS, OUT, MAX_RANK + 1), (1.0,) * LAYERS)
