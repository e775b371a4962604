"""The bf16 CPU LoRA path (loramux_kernels/cpu/sgmv_bf16.c and its torch fallback for long
segments) against the fp32 reference, with a per-dtype tolerance table.

Both builds of the C kernel run here: the native one (AVX512-BF16 where the CPU has it)
and the portable one (-mno-avx512bf16), the code a machine without AVX512-BF16 gets.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loramux.kernels.backend import select_backend
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.cpu_backend import LONG_SEGMENT_TOKENS_BY_DTYPE, CpuLoraBackend
from loramux.kernels.cpu_build import load_kernel_library
from loramux.kernels.metadata import build_lora_batch_info
from loramux.kernels.reference import add_lora_per_token, add_lora_reference
from tests.kernels.layouts import LAYOUTS, NUM_SLOTS, segment_layout

RANKS = (1, 8, 16, 64)
DTYPES = (torch.float32, torch.bfloat16)
# Tolerance of a backend's result against the fp32 reference computed from the same
# (dtype-valued) inputs. bf16: the output rounds to 8 significant bits (rtol 2^-6); the
# torch path also rounds h and the delta to bf16 before adding, which costs up to a few
# hundredths where a delta of magnitude ~10 cancels against y (atol).
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=1.6e-2)}


def _has_cpu_flag(flag: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and flag in line.split() for line in text.splitlines())


def prepared_add_lora(backend, y, x, slices, info) -> None:
    """One step as the runner does it: plan the batch once, then add the deltas."""
    backend.prepare(info)
    backend.add_lora(y, x, slices, info)


def make_buffers(in_features, out_features, max_rank, ranks, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    buffers = LoraModuleBuffers(NUM_SLOTS, max_rank, in_features, out_features, dtype, "cpu")
    for slot, rank in enumerate(ranks):
        if rank:
            a = torch.randn(rank, in_features, generator=gen) * 0.1
            b = torch.randn(out_features, rank, generator=gen) * 0.1
            buffers.write(slot, a.to(dtype), b.to(dtype), scaling=0.5 + slot)
    return buffers


def mixed_ranks(max_rank: int) -> list[int]:
    return [max_rank, 1, max(1, max_rank // 2), 0, max_rank, max(1, max_rank // 4)]


def make_case(layout, num_tokens, in_features, widths, max_rank, dtype, seed=0):
    seqs = segment_layout(layout, num_tokens, seed)
    info = build_lora_batch_info([s for s, _ in seqs], [n for _, n in seqs])
    slices = [
        make_buffers(in_features, w, max_rank, mixed_ranks(max_rank), dtype, seed + k) for k, w in enumerate(widths)
    ]
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(info.num_tokens, in_features, generator=gen).to(dtype)
    y = torch.randn(info.num_tokens, sum(widths), generator=gen).to(dtype)
    return info, slices, x, y


def expected_fp32(y, x, slices, info) -> torch.Tensor:
    """The reference in fp32 from the same inputs (the buffers are read as .float())."""
    expected = y.float()
    add_lora_reference(expected, x.float(), slices, info)
    return expected


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kcache")


@pytest.fixture(scope="module", params=["native", "portable"])
def bf16_kernel(request, kernel_cache) -> CpuLoraBackend:
    """The bf16 C backend as this machine builds it, and the build without AVX512-BF16."""
    flags = () if request.param == "native" else ("-mno-avx512bf16",)
    backend = CpuLoraBackend(load_kernel_library("sgmv_bf16", kernel_cache, flags), dtype=torch.bfloat16)
    return backend


@pytest.fixture(scope="module", params=[(d, n) for d in DTYPES for n in ("torch", "cpu")], ids=str)
def backend(request, kernel_cache):
    dtype, name = request.param
    chosen = select_backend(torch.device("cpu"), dtype, kernel_cache, name)
    assert chosen.name == name, "the C kernel did not build; see loramux_kernels/cpu_build.py"
    return dtype, chosen


def test_bf16_selects_the_c_kernel(kernel_cache):
    chosen = select_backend(torch.device("cpu"), torch.bfloat16, kernel_cache, "auto")
    assert chosen.name == "cpu" and chosen.dtype == torch.bfloat16


def test_native_build_uses_avx512_bf16_where_present(kernel_cache):
    library = load_kernel_library("sgmv_bf16", kernel_cache)
    assert bool(library.lora_sgmv_bf16_uses_dpbf16()) == _has_cpu_flag("avx512_bf16")
    portable = load_kernel_library("sgmv_bf16", kernel_cache, ("-mno-avx512bf16",))
    assert not portable.lora_sgmv_bf16_uses_dpbf16()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("max_rank", RANKS)
def test_backend_matches_reference_per_dtype(backend, layout, max_rank):
    dtype, chosen = backend
    num_tokens = 2 * LONG_SEGMENT_TOKENS_BY_DTYPE[dtype] + 5  # long and short segments both occur
    info, slices, x, y = make_case(layout, num_tokens, 200, [576], max_rank, dtype)
    expected = expected_fp32(y, x, slices, info)
    prepared_add_lora(chosen, y, x, slices, info)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, **TOLERANCE[dtype])


@pytest.mark.parametrize(
    "in_features,widths", [(576, [576, 192, 192]), (1536, [576]), (200, [1536, 1536]), (40, [24, 8])]
)
@pytest.mark.parametrize("layout", ["distinct", "zipf", "skewed", "uniform"])
def test_bf16_kernel_rounds_once(bf16_kernel, in_features, widths, layout):
    """Short segments through the C kernel: the fp32 result rounded once to bf16, up to the
    summation order (one bf16 ulp of the result, plus fp32 noise)."""
    info, slices, x, y = make_case(layout, 12, in_features, widths, 16, torch.bfloat16, seed=3)
    assert info.max_seg_len < bf16_kernel.long_segment_tokens  # every segment takes the C kernel
    expected = expected_fp32(y, x, slices, info)
    prepared_add_lora(bf16_kernel, y, x, slices, info)
    ulp = torch.finfo(torch.bfloat16).eps * expected.abs()  # 2^-7 relative: one ulp at most
    assert ((y.float() - expected).abs() <= ulp + 1e-3).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_kernel_layouts(bf16_kernel, layout):
    num_tokens = bf16_kernel.long_segment_tokens - 1  # the C kernel only
    info, slices, x, y = make_case(layout, num_tokens, 576, [576, 192], 32, torch.bfloat16, seed=5)
    expected = expected_fp32(y, x, slices, info)
    prepared_add_lora(bf16_kernel, y, x, slices, info)
    torch.testing.assert_close(y.float(), expected, **TOLERANCE[torch.bfloat16])


def test_bf16_output_column_slice_view(bf16_kernel):
    """y may be a column slice of a wider bf16 tensor; columns outside it stay untouched."""
    info, slices, x, _ = make_case("zipf", 9, 64, [48], 8, torch.bfloat16)
    wide = torch.randn(info.num_tokens, 100).to(torch.bfloat16)
    expected = wide.float()
    add_lora_reference(expected[:, 20:68], x.float(), slices, info)
    prepared_add_lora(bf16_kernel, wide[:, 20:68], x, slices, info)
    assert torch.equal(wide[:, :20].float(), expected[:, :20]) and torch.equal(wide[:, 68:].float(), expected[:, 68:])
    torch.testing.assert_close(wide.float(), expected, **TOLERANCE[torch.bfloat16])


def test_bf16_segment_scales(bf16_kernel):
    slices = [make_buffers(32, 40, 8, mixed_ranks(8), torch.bfloat16)]
    info = build_lora_batch_info([0, 0, 2], [2, 1, 3], seq_scales=[1.0, 0.25, 2.0])
    x, y = torch.randn(6, 32).to(torch.bfloat16), torch.randn(6, 40).to(torch.bfloat16)
    expected = y.float()
    add_lora_per_token(expected, x.float(), slices, [0, 0, 0, 2, 2, 2], [1.0, 1.0, 0.25, 2.0, 2.0, 2.0])
    prepared_add_lora(bf16_kernel, y, x, slices, info)
    torch.testing.assert_close(y.float(), expected, **TOLERANCE[torch.bfloat16])


def test_bf16_result_is_batch_invariant(bf16_kernel):
    """A token's delta does not depend on the other tokens of the batch (bitwise)."""
    slices = [make_buffers(576, 576, 32, mixed_ranks(32), torch.bfloat16)]
    x = torch.randn(7, 576).to(torch.bfloat16)
    y = torch.randn(7, 576).to(torch.bfloat16)
    alone = y[3:4].clone()
    prepared_add_lora(bf16_kernel, alone, x[3:4], slices, build_lora_batch_info([4], [1]))
    batched = y.clone()
    prepared_add_lora(bf16_kernel, batched, x, slices, build_lora_batch_info([0, 1, 4, 5], [2, 1, 1, 3]))
    assert torch.equal(batched[3], alone[0])


def test_bf16_kernel_rejects_fp32_tensors(bf16_kernel):
    info, slices, x, y = make_case("distinct", 4, 32, [16], 8, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        prepared_add_lora(bf16_kernel, y.float(), x.float(), slices, info)
