"""Token-level stop conditions, checked after every new token (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass

from loramux.scheduler.config import SchedulerConfig
from loramux.scheduler.request import FinishReason, Request


@dataclass(frozen=True)
class Stop:
    reason: FinishReason
    stop_reason: int | None = None  # the stop token id; None for EOS and length limits


def check_stop(request: Request, config: SchedulerConfig) -> Stop | None:
    """Token-level stop conditions after request's newest token, in priority order.

    EOS and stop_token_ids end a request only once min_tokens tokens came before the stop
    token. The stop token stays in output_token_ids (the detokenizer hides it).
    """
    params = request.sampling_params
    token_id = request.output_token_ids[-1]
    past_min_tokens = request.num_output_tokens > params.min_tokens
    if past_min_tokens and not params.ignore_eos and token_id in config.eos_token_ids:
        return Stop(FinishReason.STOP)
    if past_min_tokens and token_id in params.stop_token_ids:
        return Stop(FinishReason.STOP, stop_reason=token_id)
    if request.num_output_tokens >= params.max_tokens:
        return Stop(FinishReason.LENGTH)
    if request.num_tokens >= config.max_model_len:
        return Stop(FinishReason.LENGTH)
    if params.repetition_window and is_repetition_loop(
        request.output_token_ids, params.repetition_window, params.repetition_max_period
    ):
        return Stop(FinishReason.REPETITION)
    return None


def is_repetition_loop(token_ids: list[int], window: int, max_period: int) -> bool:
    """True when the last `window` tokens are one loop of period p <= max_period, repeated.

    "Repeated" means at least twice: p <= window // 2 and tail[i] == tail[i - p] for all i.
    """
    if window < 2 or len(token_ids) < window:
        return False
    tail = token_ids[-window:]
    for period in range(1, min(max_period, window // 2) + 1):
        if tail[period:] == tail[:-period]:
            return True
    return False
