"""Per-request sampling and stopping parameters (pure data, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import math

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS_ENTRIES = 1024  # token ids one request may bias
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, +100 all but forces it
MAX_ADAPTER_SCALE = 4.0  # a bound, so a stranger cannot blow the logits up
# The repetition guard compares the last `window` tokens against each period, per token.
MAX_REPETITION_WINDOW = 1024
MAX_REPETITION_PERIOD = 64


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range; the API maps it to a 4xx."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    typical_p: float = 1.0  # locally typical sampling (transformers' TypicalLogitsWarper); 1.0 = off
    repetition_penalty: float = 1.0  # HF semantics: divides positive logits of seen tokens
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None = off; k >= 0 = chosen token plus top-k alternatives
    prompt_logprobs: int | None = None  # same, for every prompt position after the first
    skip_special_tokens: bool = True
    # Ends a request whose last tokens repeat one loop of at most `repetition_max_period`
    # tokens for `repetition_window` tokens (0 = off). Fine-tuned adapters that never emit
    # EOS loop forever otherwise.
    repetition_window: int = 0
    repetition_max_period: int = 8
    # (token id, bias) pairs added to the logits before penalties and sampling (OpenAI
    # `logit_bias`); the logprobs reported stay those of the model.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Multiplies this request's LoRA delta: 0 = the base model, 1 = the adapter as trained.
    adapter_scale: float = 1.0
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    # A compiled grammar (server/structured) the output must follow; None = free. Opaque
    # to the scheduler: only the runner's grammar masks read it.
    grammar: object | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, "max_tokens must be at least 1")
        _check(self.temperature >= 0.0, "temperature must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        _check(self.top_k >= 0, "top_k must be >= 0 (0 disables it)")
        _check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        _check(0.0 < self.typical_p <= 1.0, "typical_p must be in (0, 1]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty must be > 0")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        _check(self.min_tokens >= 0, "min_tokens must be >= 0")
        _check(self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(
                value is None or 0 <= value <= MAX_TOP_LOGPROBS,
                f"{name} must be between 0 and {MAX_TOP_LOGPROBS}",
            )
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty")
        _check(0 <= self.repetition_window <= MAX_REPETITION_WINDOW,
               f"repetition_window must be in [0, {MAX_REPETITION_WINDOW}] (0 = off)")
        _check(1 <= self.repetition_max_period <= MAX_REPETITION_PERIOD,
               f"repetition_max_period must be in [1, {MAX_REPETITION_PERIOD}]")
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES,
               f"logit_bias may name at most {MAX_LOGIT_BIAS_ENTRIES} tokens")
        _check(
            all(token_id >= 0 and math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS
                for token_id, bias in self.logit_bias),
            f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}] for token ids >= 0",
        )
        _check(
            math.isfinite(self.adapter_scale) and 0.0 <= self.adapter_scale <= MAX_ADAPTER_SCALE,
            f"adapter_scale must be in [0, {MAX_ADAPTER_SCALE:g}]",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSamplingParams(message)
