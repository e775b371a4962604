"""loramux_kernels/slot_copy.py: the CPU's streaming slot copy gives exactly torch's values
(fp32 math, one rounding to the buffer's dtype), and declines what it does not handle."""

from __future__ import annotations

import pytest
import torch

from loramux.kernels.buffers import LoraModuleStack
from loramux.kernels.slot_copy import copy_blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [1, 15, 33, 576])  # tails, sub-line blocks, full lines
@pytest.mark.parametrize("scaled", [False, True])
def test_equals_torch_into_a_strided_slot(dtype, cols, scaled):
    gen = torch.Generator().manual_seed(cols)
    layers, slots, rows = 3, 4, 5
    buffers = torch.full((layers, slots, 7, cols), 9.0, dtype=dtype)
    src = (torch.randn(layers, rows, cols, generator=gen) * 1e3).to(dtype)
    src[0, 0, 0] = float("inf")
    src[1, -1, -1] = 3.3e38 if dtype == torch.float32 else 3.38e38  # overflows once scaled
    scales = torch.tensor([0.5, 2.0, 1.7], dtype=torch.float32)
    for slot in range(slots):  # slot offsets: destinations off a 64-byte boundary too
        dst = buffers[:, slot, :rows]
        assert copy_blocks(dst, src, scales if scaled else None)
        expected = torch.mul(src, scales.view(-1, 1, 1)).to(dtype) if scaled else src
        assert torch.equal(dst, expected)
    assert torch.equal(buffers[:, :, rows:], torch.full_like(buffers[:, :, rows:], 9.0))  # rows past r untouched


def test_declines_what_torch_must_do():
    dst = torch.zeros(2, 3, 4)
    assert not copy_blocks(dst.double(), torch.zeros(2, 3, 4, dtype=torch.float64))  # dtype
    assert not copy_blocks(dst, torch.zeros(2, 3, 4, dtype=torch.bfloat16))  # mixed dtypes
    assert not copy_blocks(dst, torch.zeros(2, 4, 3).transpose(1, 2))  # a block not contiguous
    assert not copy_blocks(dst, torch.zeros(2, 3, 4), torch.ones(2, dtype=torch.float64))  # scale dtype
    assert not copy_blocks(dst, torch.zeros(2, 3, 5))  # shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stack_write_matches_per_layer_writes(dtype):
    """The stacked write (streaming copy) fills the slot exactly as layer-by-layer writes (torch)."""
    gen = torch.Generator().manual_seed(0)
    num_layers, rank = 3, 4
    stacked = LoraModuleStack(num_layers, 3, 8, 24, 40, dtype, "cpu")
    single = LoraModuleStack(num_layers, 3, 8, 24, 40, dtype, "cpu")
    a = torch.randn(num_layers, rank, 24, generator=gen).to(dtype)
    b = torch.randn(num_layers, rank, 40, generator=gen).to(dtype).transpose(1, 2)  # as the CPU tier holds it
    scalings = (0.5, 2.0, 1.3)
    stacked.write(1, a, b, scalings)
    for i, layer in enumerate(single.layers):
        layer.write(1, a[i], b[i], scalings[i])
    assert torch.equal(stacked.lora_a, single.lora_a) and torch.equal(stacked.lora_b, single.lora_b)
