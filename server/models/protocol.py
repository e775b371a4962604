"""What the runner and the builder need from a model, whatever its family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from loramux.kernels.attention.backend import AttentionBackend
from loramux.kernels.backend import LoraBackend
from loramux.kernels.buffers import LoraModuleBuffers
from loramux.kernels.metadata import LoraBatchInfo
from loramux.server.models.spec import ModelSpec


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    lora: LoraBatchInfo
    attention: Any  # the attention backend's metadata for this step


class ServingModel(Protocol):
    spec: ModelSpec
    lora_backend: LoraBackend
    attention_backend: AttentionBackend

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def lora_buffers(self) -> dict[tuple[int, str], LoraModuleBuffers]:
        """(layer index, serving module name) -> its slot buffers (for the adapter store)."""
        ...

    def forward(
        self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:  # fp32 [num_tokens, hidden], after the final norm
        ...

    def compute_logits(self, hidden: torch.Tensor, lora: LoraBatchInfo | None = None) -> torch.Tensor:
        """fp32 [n, hidden] final-normed rows -> fp32 logits [n, vocab]; `lora` (the rows'
        slots) adds lm_head adapters."""
        ...
