"""Per-step LoRA batch metadata: which adapter slot each token uses, as segments.

The runner orders a step's sequences by adapter slot, so the tokens that share an adapter
are consecutive rows of the flat batch; one segment is one run of equal (slot, scale).
The metadata is built once per step (`build_lora_batch_info`) and never mutated.

Room to grow without a redesign:
- a per-request scale is a per-segment scale: requests with other scales end a segment;
- a request naming several weighted adapters contributes its rows to several segments;
  that needs segments to point at rows through a gather index (`token_indices`, as
  vLLM's and SGLang's metadata do) instead of contiguous ranges, and adds that one field.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loramux.kernels.staging import DeviceUpload

NO_ADAPTER = -1  # slot index of tokens that get no delta (base-model requests)


@dataclass(frozen=True)
class LoraBatchInfo:
    # int32 [num_segments + 1]: token offsets; segment i is rows seg_indptr[i]:seg_indptr[i+1]
    seg_indptr: torch.Tensor
    # int32 [num_segments]: adapter slot of each segment, NO_ADAPTER (-1) = base, no delta
    slot_indices: torch.Tensor
    # float32 [num_segments]: extra multiplier of each segment's delta (1.0 unless a request
    # asks for a scaled adapter); each adapter's own alpha/r scaling lives in its weights
    seg_scales: torch.Tensor
    # int32 [num_tokens]: adapter slot of each token (the BGMV view of the same mapping)
    token_slots: torch.Tensor
    num_tokens: int
    max_seg_len: int
    # Host copies, so CPU loops and launch decisions never read device memory.
    seg_indptr_host: tuple[int, ...]
    slot_indices_host: tuple[int, ...]
    seg_scales_host: tuple[float, ...]

    @property
    def num_segments(self) -> int:
        return len(self.slot_indices_host)

    @property
    def has_adapters(self) -> bool:
        return any(slot != NO_ADAPTER for slot in self.slot_indices_host)


def build_lora_batch_info(
    seq_slots: Sequence[int],
    seq_num_tokens: Sequence[int],
    seq_scales: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> LoraBatchInfo:
    """Merge consecutive sequences that share (slot, scale) into segments.

    seq_slots[j] is sequence j's adapter slot (NO_ADAPTER for base), seq_num_tokens[j] its
    number of rows in this step's flat batch; sequences appear in row order.
    """
    upload = DeviceUpload(device)
    finish = stage_lora_batch_info(seq_slots, seq_num_tokens, seq_scales, upload)
    upload.send()
    return finish()


def stage_lora_batch_info(
    seq_slots: Sequence[int],
    seq_num_tokens: Sequence[int],
    seq_scales: Sequence[float] | None,
    upload: DeviceUpload,
) -> Callable[[], LoraBatchInfo]:
    """build_lora_batch_info in two halves around the step's one copy: stage the host
    tensors in `upload` now; the returned function builds the info after `upload.send()`."""
    if len(seq_slots) != len(seq_num_tokens):
        raise ValueError("seq_slots and seq_num_tokens differ in length")
    scales = [1.0] * len(seq_slots) if seq_scales is None else [float(s) for s in seq_scales]
    indptr = [0]
    slots: list[int] = []
    seg_scales: list[float] = []
    token_slots: list[int] = []
    for slot, n, scale in zip(seq_slots, seq_num_tokens, scales):
        if n < 0:
            raise ValueError("a sequence cannot have a negative number of tokens")
        token_slots.extend([slot] * n)
        if slots and slots[-1] == slot and seg_scales[-1] == scale:
            indptr[-1] += n
            continue
        slots.append(slot)
        seg_scales.append(scale)
        indptr.append(indptr[-1] + n)
    max_seg_len = max((b - a for a, b in zip(indptr, indptr[1:])), default=0)
    handles = (
        upload.add(torch.tensor(indptr, dtype=torch.int32)),
        upload.add(torch.tensor(slots, dtype=torch.int32)),
        upload.add(torch.tensor(seg_scales, dtype=torch.float32)),
        upload.add(torch.tensor(token_slots, dtype=torch.int32)),
    )

    def finish() -> LoraBatchInfo:
        indptr_d, slots_d, scales_d, token_slots_d = (upload.get(h) for h in handles)
        return LoraBatchInfo(
            seg_indptr=indptr_d,
            slot_indices=slots_d,
            seg_scales=scales_d,
            token_slots=token_slots_d,
            num_tokens=indptr[-1],
            max_seg_len=max_seg_len,
            seg_indptr_host=tuple(indptr),
            slot_indices_host=tuple(slots),
            seg_scales_host=tuple(seg_scales),
        )

    return finish
