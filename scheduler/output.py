"""What crosses between the scheduler and the model runner each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.scheduler.request import FinishReason, Request


@dataclass(frozen=True)
class SchedulerOutput:
    # [num_scheduled] requests that run this step, in the order they were scheduled.
    # The runner reads them (tokens, block table, adapter slot) and never mutates them.
    scheduled_requests: list[Request]
    # [num_scheduled] tokens each request computes this step: 1 for a decode, up to the
    # rest of the prompt for a (chunked) prefill.
    num_scheduled_tokens: list[int]
    # sum(num_scheduled_tokens) <= SchedulerConfig.max_num_batched_tokens
    total_num_scheduled_tokens: int
    # ids of requests that ended or were preempted since the last step: the runner drops
    # whatever per-request state it keeps (sampling generators).
    finished_request_ids: frozenset[str] = frozenset()
    preempted_request_ids: frozenset[str] = frozenset()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_requests


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprob of one chosen token and the top alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass(frozen=True)
class ModelRunnerOutput:
    # request_id -> sampled token, for each request whose scheduled chunk reached the end
    # of its known tokens (a decode, or the last chunk of a prefill).
    sampled_token_ids: dict[str, int]
    # request_id -> logprobs of the sampled token (only requests that asked for them).
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # request_id -> logprobs of the prompt tokens computed this step (prompt_logprobs).
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # request_id -> error message: this request failed inside the runner; the others go on.
    failed: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestDelta:
    """What one request gained in one step, returned by Scheduler.update()."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    error: str | None = None
    stop_reason: int | str | None = None
