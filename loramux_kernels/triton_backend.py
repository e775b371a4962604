"""The CUDA LoRA backend: Triton SGMV kernels for segments, BGMV kernels for decode.

Each `add_lora` call is two launches, whatever the number of adapters, ranks and output
slices: a shrink (h = x @ A.T, fp32) and an expand (y += scale * h @ B) over all slices.

Dispatch rule, decided once per step from host ints of LoraBatchInfo:
    BGMV (one adapter per token)     if info.max_seg_len <= BGMV_MAX_SEG_LEN
    SGMV (tiles of segment rows)     otherwise
BGMV fits decode steps where every adapter has only a few tokens: one program per token,
no row tiles that are mostly padding. SGMV fits prefill, mixed steps and decode steps in
which adapters are shared by many tokens: each BLOCK_M-row tile reads its adapter's
weights once instead of once per token. (The threshold is a first guess; measure with
bench/bench_kernels_cuda.py.)

Per-call host work is a dict lookup for the slices' pointer table (built once per
projection) and the shape checks; per-step work (the SGMV tile list, per-token scales) is
built once, from host copies, by `prepare(info)`, which the runner calls once per step. Nothing
reads device memory on the host (no .item()).

CUDA only: `select_backend` imports this module for name="triton" or a CUDA device; the
CPU path never does. The tests also run it on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import LoraBatchInfo
from loramux.kernels.triton.bgmv_expand import bgmv_expand
from loramux.kernels.triton.bgmv_shrink import bgmv_shrink
from loramux.kernels.triton.common import LoraSliceTable, SgmvTiles
from loramux.kernels.triton.sgmv_expand import sgmv_expand
from loramux.kernels.triton.sgmv_shrink import sgmv_shrink

# Steps whose longest segment has at most this many tokens go through BGMV.
BGMV_MAX_SEG_LEN = 4


@dataclass(frozen=True)
class _StepPlan:
    """How one step's LoRA work is launched (computed once per step, used by every layer)."""

    active: bool  # some token has an adapter
    use_bgmv: bool
    tiles: SgmvTiles | None  # SGMV work list (SGMV steps only)
    token_scales: torch.Tensor | None  # float32 [num_tokens] (BGMV steps with a scale != 1)


def plan_step(info: LoraBatchInfo, bgmv_max_seg_len: int = BGMV_MAX_SEG_LEN) -> _StepPlan:
    if info.num_tokens == 0 or not info.has_adapters:
        return _StepPlan(active=False, use_bgmv=False, tiles=None, token_scales=None)
    if info.max_seg_len > bgmv_max_seg_len:
        return _StepPlan(active=True, use_bgmv=False, tiles=SgmvTiles.build(info), token_scales=None)
    token_scales = None
    if any(scale != 1.0 for scale in info.seg_scales_host):
        indptr = info.seg_indptr_host
        lengths = torch.tensor([b - a for a, b in zip(indptr, indptr[1:])], dtype=torch.int64)
        host = torch.repeat_interleave(torch.tensor(info.seg_scales_host, dtype=torch.float32), lengths)
        device = info.seg_scales.device
        token_scales = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return _StepPlan(active=True, use_bgmv=True, tiles=None, token_scales=token_scales)


class TritonLoraBackend:
    name = "triton"

    def __init__(self, bgmv_max_seg_len: int = BGMV_MAX_SEG_LEN) -> None:
        self.bgmv_max_seg_len = bgmv_max_seg_len
        self._tables: dict[tuple[LoraModuleBuffers, ...], LoraSliceTable] = {}
        self._prepared: LoraBatchInfo | None = None  # the info `prepare` planned
        self._plan: _StepPlan | None = None

    def prepare(self, info: LoraBatchInfo) -> None:
        """Plan the step's launches (BGMV or SGMV tiles) once, for every layer."""
        self._plan = plan_step(info, self.bgmv_max_seg_len)
        self._prepared = info

    def step_plan(self, info: LoraBatchInfo) -> _StepPlan:
        """The plan `prepare(info)` made; calling add_lora without it is a bug."""
        if self._plan is None or info is not self._prepared:
            raise RuntimeError("add_lora called with a LoraBatchInfo that prepare() did not plan")
        return self._plan

    def slice_table(self, slices: Sequence[LoraModuleBuffers]) -> LoraSliceTable:
        key = slices if isinstance(slices, tuple) else tuple(slices)
        table = self._tables.get(key)  # keyed by buffer identity; the table keeps them alive
        if table is None:
            table = self._tables[key] = LoraSliceTable.build(key)
        return table

    def add_lora(
        self,
        y: torch.Tensor,  # [num_tokens, sum of slice widths], updated in place
        x: torch.Tensor,  # [num_tokens, in_features]
        slices: Sequence[LoraModuleBuffers],
        info: LoraBatchInfo,
    ) -> None:
        """Semantics: for each segment i (slot w != -1) and output slice k at offset off_k:
        y[s[i]:s[i+1], off_k:off_k+n_k] += seg_scales[i] * (x[s[i]:s[i+1]] @ A_k[w,:r].T) @ B_k[w,:r]
        with r = ranks_k[w] (see loramux_kernels/reference.py)."""
        plan = self.step_plan(info)
        if not plan.active:
            return
        table = self.slice_table(slices)
        if plan.use_bgmv:
            h = bgmv_shrink(x, table, info.token_slots)
            bgmv_expand(y, h, table, info.token_slots, plan.token_scales)
        else:
            h = sgmv_shrink(x, table, info, tiles=plan.tiles)
            sgmv_expand(y, h, table, info, tiles=plan.tiles)
