"""A generation request as the scheduler tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from loramux.scheduler.sampling_params import SamplingParams

BASE_SLOT = -1  # adapter slot of requests that use the base model alone


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # KV dropped; waits again and recomputes from scratch
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the client went away or asked to cancel
    ERROR = "error"  # this request failed; the others go on
    REPETITION = "repetition"  # the repetition guard ended a loop


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    adapter_id: str | None = None  # None = base model
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache. Reset to 0 on preemption (recompute).
    num_computed_tokens: int = 0
    # KV-cache block table, owned by the scheduler's block manager.
    block_ids: list[int] = field(default_factory=list)
    # Device slot leased from the adapter store while running, and kept while waiting
    # after a preemption (BASE_SLOT for base).
    # An int lease, never interchangeable with adapter_id: a replaced adapter keeps
    # serving its running requests from the old slot.
    adapter_slot: int | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None  # message when finish_reason is ERROR
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self._all_token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt then output tokens. Read-only view by convention: append via append_output."""
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
