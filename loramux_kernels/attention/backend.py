"""The attention seam: every layer makes one call; who serves it is chosen once.

Per step the runner asks the backend for its metadata once (`build_metadata`, from host
lists, one host-to-device copy); every layer then calls `forward` with it and its own
`AttentionLayer` parameters (scale, sliding window, soft-capping). Backends: torch
(gather + SDPA, the reference; torch_paged.py), cpu (decodes read the paged cache in
place in C; cpu_paged.py), triton (CUDA paged decode; triton_paged.py). Prefill chunks
go through SDPA in all of them. No layer branches on the backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from loramux.kernels.staging import DeviceUpload

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionLayer:
    """What differs between the attention calls of a model's layers."""

    scale: float  # multiplies q @ k.T (head_dim ** -0.5, or Gemma's query_pre_attn_scalar ** -0.5)
    # Sliding window: query position i sees key positions j with i - window < j <= i
    # (transformers' sliding_window_overlay); None = full causal attention.
    window: int | None = None
    softcap: float | None = None  # scores -> softcap * tanh(scores / softcap) (Gemma 2)


class AttentionBackend(Protocol):
    name: str

    def build_metadata(
        self,
        seq_starts: Sequence[int],  # per sequence: position of its first token in this step
        seq_num_tokens: Sequence[int],  # per sequence: tokens in this step (rows in batch order)
        seq_block_ids: Sequence[Sequence[int]],  # per sequence: its KV blocks
        block_size: int,
        windows: Sequence[int],  # the sliding windows the model's layers use
        device: torch.device,
    ) -> Any:
        """The step's metadata, built once and read by every layer."""
        ...

    def stage_metadata(
        self,
        seq_starts: Sequence[int],
        seq_num_tokens: Sequence[int],
        seq_block_ids: Sequence[Sequence[int]],
        block_size: int,
        windows: Sequence[int],
        upload: DeviceUpload,
    ) -> Callable[[], Any]:
        """build_metadata around the step's one copy: stage host tensors in `upload`; the
        returned function builds the metadata after `upload.send()`."""
        ...

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotary applied
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotary applied
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: Any,
        layer: AttentionLayer,
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        """Write k, v into the cache at the step's slots, then attend over each sequence's context."""
        ...


ATTENTION_BACKENDS = ("auto", "cpu", "triton", "torch")


def select_attention_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """Pick the attention backend once: auto is the paged C kernel on the CPU, the Triton
    paged decode on CUDA, and the torch (gather + SDPA) backend where neither can run."""
    from loramux.kernels.attention.torch_paged import TorchPagedAttention

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: expected one of {', '.join(ATTENTION_BACKENDS)}")
    device = torch.device(device)
    if name == "torch":
        return TorchPagedAttention()
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        from loramux.kernels.attention.cpu_paged import CpuPagedAttention
        from loramux.kernels.cpu_build import KernelBuildError

        try:
            return CpuPagedAttention.create()
        except KernelBuildError as exc:
            if name == "cpu":
                raise
            logger.warning("paged attention kernel unavailable, using the torch backend: %s", exc)
            return TorchPagedAttention()
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        try:
            from loramux.kernels.attention.triton_paged import TritonPagedAttention
        except ImportError as exc:
            if name == "triton":
                raise
            logger.warning("Triton unavailable, using the torch attention backend: %s", exc)
            return TorchPagedAttention()
        return TritonPagedAttention()
    return TorchPagedAttention()
