"""The Triton SGMV / BGMV kernels against loramux_kernels/reference.py (interpreter on CPU, or a GPU).

Every case poisons what the kernels must not read: weight rows past each slot's rank are
NaN (so mixed ranks are proven to be masked, not padded with zeros) and so are the x rows
of base (-1) tokens. Shapes stay tiny: the interpreter is ~1000x slower than a GPU.

The matrix, trimmed where the interpreter would make it slow (every axis stays covered):
- fp32: the full product of layouts x ranks x (in, out) sizes (576, 200), (200, 1536),
  (1536, 576), for both paths (SGMV and BGMV): 216 cases;
- fp16 / bf16: ranks x sizes for both paths, the layout rotating over the cases instead of
  a full product (each of the 9 layouts still runs in half precision);
- split-K, SGMV tiles spanning long segments, fused slices: a few cases each.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

from loramux.kernels.buffers import LoraModuleBuffers  # noqa: E402
from loramux.kernels.metadata import NO_ADAPTER, build_lora_batch_info  # noqa: E402
from loramux.kernels.reference import add_lora_reference  # noqa: E402
from loramux.kernels.triton.bgmv_expand import bgmv_expand  # noqa: E402
from loramux.kernels.triton.bgmv_shrink import bgmv_shrink  # noqa: E402
from loramux.kernels.triton.common import KernelConfig, LoraSliceTable, SgmvTiles  # noqa: E402
from loramux.kernels.triton.sgmv_expand import sgmv_expand  # noqa: E402
from loramux.kernels.triton.sgmv_shrink import sgmv_shrink  # noqa: E402
from tests.kernels.layouts import LAYOUTS, segment_layout  # noqa: E402
from tests.kernels.test_cpu_backends import make_buffers, mixed_ranks  # noqa: E402

pytestmark = pytest.mark.triton

RANKS = (1, 8, 16, 64)
SIZES = ((576, 200), (200, 1536), (1536, 576))  # (in_features, out_features), odd ones included
NUM_TOKENS = 12
PATHS = ("sgmv", "bgmv")
# y against the fp32 reference computed from the same rounded inputs and weights.
TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=2e-2),
}
# h is accumulated in fp32 from exactly representable products whatever the dtype.
H_TOLERANCE = dict(atol=1e-4, rtol=1e-4)


def to_buffers(src: LoraModuleBuffers, dtype, device, poison: bool = True) -> LoraModuleBuffers:
    """A copy of `src` in dtype on device; rows past each slot's rank set to NaN."""
    out = LoraModuleBuffers(src.max_slots, src.max_rank, src.in_features, src.out_features, dtype, device)
    out.lora_a.copy_(src.lora_a)
    out.lora_b.copy_(src.lora_b)
    out.ranks.copy_(src.ranks)
    out.ranks_host[:] = src.ranks_host
    if poison:
        for slot, rank in enumerate(src.ranks_host):
            out.lora_a[slot, rank:] = float("nan")
            out.lora_b[slot, rank:] = float("nan")
    return out


class Case:
    """One batch: metadata, slices, x and y on the device, and the fp32 expectations."""

    def __init__(self, seqs, in_features, widths, max_ranks, dtype, device, seed=0, scales=None):
        self.info = build_lora_batch_info([s for s, _ in seqs], [n for _, n in seqs], scales, device=device)
        self.slices = [
            to_buffers(make_buffers(in_features, w, r, mixed_ranks(r), seed + k), dtype, device)
            for k, (w, r) in enumerate(zip(widths, max_ranks))
        ]
        self.table = LoraSliceTable.build(self.slices)
        gen = torch.Generator().manual_seed(seed + 100)
        x = torch.randn(self.info.num_tokens, in_features, generator=gen)
        base_rows = self.info.token_slots.cpu() == NO_ADAPTER
        x[base_rows] = float("nan")  # base tokens' inputs are never read
        self.x = x.to(dtype).to(device)
        self.y = torch.randn(self.info.num_tokens, sum(widths), generator=gen).to(dtype).to(device)
        # The reference, in fp32 on the CPU, on exactly the values the kernels see.
        ref_slices = [to_buffers(b, torch.float32, "cpu", poison=False) for b in self.slices]
        x32 = self.x.float().cpu()
        self.expected_y = self.y.float().cpu().clone()  # .float() on fp32 is no copy
        add_lora_reference(self.expected_y, x32, ref_slices, self.info)
        self.expected_h, self.h_mask = shrink_reference(x32, ref_slices, self.info, self.table.max_rank)

    def token_scales(self) -> torch.Tensor:
        indptr = self.info.seg_indptr_host
        lengths = torch.tensor([b - a for a, b in zip(indptr, indptr[1:])])
        return torch.repeat_interleave(self.info.seg_scales.cpu(), lengths).to(self.info.seg_scales.device)

    def run(self, path, y=None, x=None, shrink_config=None, block_m=None, scales=False) -> torch.Tensor:
        """Shrink then expand through `path`; returns h summed over its splits (fp32, CPU)."""
        y = self.y if y is None else y
        x = self.x if x is None else x
        if path == "sgmv":
            tiles = SgmvTiles.build(self.info, block_m)
            h = sgmv_shrink(x, self.table, self.info, tiles, shrink_config)
            sgmv_expand(y, h, self.table, self.info, tiles)
        else:
            h = bgmv_shrink(x, self.table, self.info.token_slots, shrink_config)
            bgmv_expand(y, h, self.table, self.info.token_slots, self.token_scales() if scales else None)
        return h.sum(0).cpu()

    def check(self, h: torch.Tensor, dtype) -> None:
        torch.testing.assert_close(h[self.h_mask], self.expected_h[self.h_mask], **H_TOLERANCE)
        torch.testing.assert_close(self.y.float().cpu(), self.expected_y, **TOLERANCES[dtype])


def shrink_reference(x, slices, info, max_rank):
    """h[s:e, k*R : k*R+r] = x[s:e] @ A_k[w, :r].T per adapted segment, and where it is defined."""
    h = torch.zeros(info.num_tokens, len(slices) * max_rank)
    mask = torch.zeros_like(h, dtype=torch.bool)
    for i, slot in enumerate(info.slot_indices_host):
        start, end = info.seg_indptr_host[i], info.seg_indptr_host[i + 1]
        if slot == NO_ADAPTER:
            continue
        for k, buffers in enumerate(slices):
            rank = buffers.ranks_host[slot]
            cols = slice(k * max_rank, k * max_rank + rank)
            h[start:end, cols] = x[start:end] @ buffers.lora_a[slot, :rank].T
            mask[start:end, cols] = True
    return h, mask


def _fp32_cases():
    for layout in LAYOUTS:
        for rank in RANKS:
            for in_features, out_features in SIZES:
                case_id = f"{layout}-r{rank}-{in_features}x{out_features}"
                yield pytest.param(layout, rank, in_features, out_features, id=case_id)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout,rank,in_features,out_features", list(_fp32_cases()))
def test_kernels_match_reference_fp32(triton_device, path, layout, rank, in_features, out_features):
    seqs = segment_layout(layout, NUM_TOKENS)
    case = Case(seqs, in_features, [out_features], [rank], torch.float32, triton_device)
    case.check(case.run(path), torch.float32)


def _half_cases():
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for ri, rank in enumerate(RANKS):
            for si, (in_features, out_features) in enumerate(SIZES):
                layout = LAYOUTS[(ri * len(SIZES) + si) % len(LAYOUTS)]
                case_id = f"{name}-{layout}-r{rank}-{in_features}x{out_features}"
                yield pytest.param(dtype, layout, rank, in_features, out_features, id=case_id)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,layout,rank,in_features,out_features", list(_half_cases()))
def test_kernels_match_reference_half(triton_device, path, dtype, layout, rank, in_features, out_features):
    seqs = segment_layout(layout, NUM_TOKENS, seed=1)
    case = Case(seqs, in_features, [out_features], [rank], dtype, triton_device, seed=1)
    case.check(case.run(path), dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,split_k", [(torch.float32, 5), (torch.bfloat16, 2)])
def test_shrink_split_k(triton_device, path, dtype, split_k):
    """Split-K partials sum to the product; with 5 splits of 64 over 200 inputs, one is empty."""
    case = Case(segment_layout("zipf", NUM_TOKENS, seed=2), 200, [576], [16], dtype, triton_device, seed=2)
    h = case.run(path, shrink_config=KernelConfig(block_n=16, block_k=64, split_k=split_k))
    case.check(h, dtype)


@pytest.mark.parametrize("block_m", [16, None])
def test_sgmv_segments_span_tiles(triton_device, block_m):
    """A 37-token prefill beside decodes: several BLOCK_M tiles per segment (16) or one 64-row tile."""
    seqs = segment_layout("skewed", 40)
    case = Case(seqs, 200, [576], [16], torch.float32, triton_device, seed=3)
    tiles = SgmvTiles.build(case.info, block_m)
    assert tiles.num_tiles == (3 + 3 if block_m == 16 else 1 + 3)
    case.check(case.run("sgmv", block_m=block_m), torch.float32)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_qkv_slices_gqa(triton_device, path, dtype):
    """One launch serves q, k, v with GQA widths (576, 192, 192), each with its own A/B/ranks."""
    seqs = segment_layout("zipf", NUM_TOKENS, seed=4)
    case = Case(seqs, 576, [576, 192, 192], [16, 16, 16], dtype, triton_device, seed=4)
    case.check(case.run(path), dtype)


@pytest.mark.parametrize("path", PATHS)
def test_slices_with_different_max_ranks(triton_device, path):
    """Slices whose buffers differ in max rank (and so in strides) share one launch."""
    seqs = segment_layout("uniform", NUM_TOKENS)
    case = Case(seqs, 200, [64, 40, 48], [16, 8, 32], torch.float32, triton_device, seed=5)
    case.check(case.run(path), torch.float32)


@pytest.mark.parametrize("path", PATHS)
def test_strided_views(triton_device, path):
    """y a column slice of a wider tensor, x a column slice too (row strides > widths)."""
    case = Case(segment_layout("skewed", NUM_TOKENS), 200, [48], [8], torch.float32, triton_device, seed=6)
    wide_y = torch.randn(case.info.num_tokens, 100, device=triton_device)
    wide_y[:, 20:68] = case.y
    wide_x = torch.randn(case.info.num_tokens, 300, device=triton_device)
    wide_x[:, 50:250] = case.x
    untouched = wide_y.clone()
    h = case.run(path, y=wide_y[:, 20:68], x=wide_x[:, 50:250])
    case.y = wide_y[:, 20:68]
    case.check(h, torch.float32)
    torch.testing.assert_close(wide_y[:, :20], untouched[:, :20], atol=0, rtol=0)
    torch.testing.assert_close(wide_y[:, 68:], untouched[:, 68:], atol=0, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_segment_scales(triton_device, path):
    """Per-segment scales (SGMV reads seg_scales, BGMV per-token scales) multiply the delta."""
    seqs = [(0, 2), (0, 1), (2, 3), (-1, 1), (5, 2)]
    case = Case(seqs, 200, [40], [8], torch.float32, triton_device, seed=7, scales=[1.0, 0.25, 2.0, 1.0, -0.5])
    assert case.info.num_segments == 5
    case.check(case.run(path, scales=True), torch.float32)


def test_all_base_launches_nothing(triton_device):
    case = Case(segment_layout("all_base", NUM_TOKENS), 200, [40], [8], torch.float32, triton_device)
    assert SgmvTiles.build(case.info).num_tiles == 0
    before = case.y.clone()
    for path in PATHS:
        case.run(path)
    torch.testing.assert_close(case.y, before, atol=0, rtol=0)


def test_wrappers_check_inputs(triton_device):
    case = Case(segment_layout("zipf", NUM_TOKENS), 200, [40], [8], torch.float32, triton_device)
    info, table = case.info, case.table
    with pytest.raises(ValueError, match="float16"):
        sgmv_shrink(case.x.half(), table, info)
    with pytest.raises(ValueError, match=r"\[12, 200\]"):
        bgmv_shrink(case.x[:, :100], table, info.token_slots)
    with pytest.raises(ValueError, match="token_slots"):
        bgmv_shrink(case.x, table, info.token_slots.long())
    h = sgmv_shrink(case.x, table, info)
    with pytest.raises(ValueError, match="h must be"):
        sgmv_expand(case.y, h[:, :, :4], table, info)
    with pytest.raises(ValueError, match="float32"):
        bgmv_expand(case.y, h.half(), table, info.token_slots)
    with pytest.raises(ValueError, match="y must be"):
        bgmv_expand(case.y[:, :10], h, table, info.token_slots)
    with pytest.raises(ValueError, match="powers of two >= 16"):
        sgmv_shrink(case.x, table, info, config=KernelConfig(block_n=8, block_k=64))
    with pytest.raises(ValueError, match="powers of two"):
        bgmv_expand(case.y, h, table, info.token_slots, config=KernelConfig(block_n=96, block_k=16))
    other = LoraModuleBuffers(6, 8, 200, 16, torch.float16, triton_device)
    with pytest.raises(ValueError, match="one dtype"):
        LoraSliceTable.build([case.slices[0], other])
    narrow = LoraModuleBuffers(6, 8, 100, 16, torch.float32, triton_device)
    with pytest.raises(ValueError, match="in_features"):
        LoraSliceTable.build([case.slices[0], narrow])
