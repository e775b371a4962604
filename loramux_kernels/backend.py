"""The one LoRA call every adapted projection makes, and the choice of who serves it.

The backend is chosen once at start-up (`select_backend`); no layer branches on it.
Per-step planning is explicit: `prepare(info)` once, then `add_lora` per layer.
DoRA adds no backend work: its per-token rescale (loramux_kernels/dora.py) follows `add_lora`
in the layer, in plain torch ops, whatever the backend; embedding LoRA is a gather
(loramux_kernels/embedding_lora.py); lm_head LoRA is one more `add_lora` on the logits rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import LoraBatchInfo


class LoraBackend(Protocol):
    """Per step: the runner calls `prepare(info)` once, then every adapted layer calls
    `add_lora(..., info)` with that same info (vLLM's punica `update_metadata`)."""

    name: str

    def prepare(self, info: LoraBatchInfo) -> None:
        """Plan the step's launches from the host copies in `info` (once per step)."""
        ...

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
        ...


def select_backend(
    device: torch.device, dtype: torch.dtype, cache_dir: Path | None = None, name: str = "auto"
) -> LoraBackend:
    """Pick the backend for this device once. `name` forces one ("torch", "cpu", "triton")."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "torch":
        from loramux.kernels.torch_backend import TorchLoraBackend

        return TorchLoraBackend()
    if name == "cpu":
        from loramux.kernels.cpu_backend import CpuLoraBackend

        return CpuLoraBackend.create(dtype=dtype, cache_dir=cache_dir)
    if name == "triton":
        from loramux.kernels.triton_backend import TritonLoraBackend  # CUDA only; never imported on CPU

        return TritonLoraBackend()
    raise ValueError(f"unknown LoRA backend {name!r}: expected auto, torch, cpu or triton")
