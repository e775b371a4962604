"""What the engine hands to its callers: one delta per request per step."""

from __future__ import annotations

from dataclasses import dataclass, field

from loramux.scheduler.output import TokenLogprobs
from loramux.scheduler.request import FinishReason


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_text: str  # complete characters only; held back while they may start a stop string
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # generated so far, this delta included
    error: str | None = None  # set when finish_reason is ERROR
    timestamp: float = 0.0  # time.monotonic() when the step that produced it ended


@dataclass
class CompletedRequest:
    """A request's outputs accumulated to the end (offline use, tests, non-streaming APIs)."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def add(self, delta: RequestOutput) -> None:
        self.text += delta.new_text
        self.token_ids.extend(delta.new_token_ids)
        self.logprobs.extend(delta.new_logprobs)
        self.prompt_logprobs.extend(delta.prompt_logprobs)
        self.num_prompt_tokens = delta.num_prompt_tokens
        if delta.new_token_ids and self.first_token_time is None:
            self.first_token_time = delta.timestamp
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason
            self.error = delta.error
            self.finish_time = delta.timestamp
