"""Between the HTTP routes and the engine: adapters, prompts, limits, seeds, metrics.

Routes turn their own request shapes into a `Generation` and their own error shapes out of
a `ServiceError`; everything they have in common lives here.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from loramux.adapter_store.errors import AdapterError, InvalidAdapterId
from loramux.adapter_store.store import AdapterStatus
from loramux.scheduler.request import FinishReason
from loramux.scheduler.sampling_params import InvalidSamplingParams, SamplingParams
from loramux.server.builder import EngineParts
from loramux.server.engine import AsyncEngine, EngineDead
from loramux.server.metrics import ServerMetrics
from loramux.server.outputs import RequestOutput

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error a client caused or should know about; routes map `kind` to their status codes."""

    kind = "internal"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServiceError):
    kind = "validation"


class UnknownAdapter(ServiceError):
    kind = "not_found"


class Overloaded(ServiceError):
    kind = "overloaded"


class GenerationFailed(ServiceError):
    kind = "generation"


@dataclass(frozen=True)
class Generation:
    """One request as the engine will run it."""

    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    endpoint: str  # for metrics: "generate", "chat", "completions"


class GenerationService:
    def __init__(self, parts: EngineParts, engine: AsyncEngine, metrics: ServerMetrics) -> None:
        self.parts = parts
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = parts.tokenizer
        self.config = parts.config
        self.served_model_name = parts.config.model.served_model_name
        self.max_model_len = parts.core.max_model_len
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self._in_flight = 0
        self._engine_ids = itertools.count()  # engine ids stay unique when a client reuses X-Request-Id

    # ------------------------------------------------------------------ inputs

    def resolve_adapter(self, name: str | None, param: str = "adapter_id") -> str | None:
        """None, "" or the base model's name mean the base model; anything else must be a
        registered adapter that has not failed."""
        if name is None or name == "" or name == self.served_model_name:
            return None
        store = self.parts.store
        try:
            info = store.info(name)
        except InvalidAdapterId as exc:
            raise UnknownAdapter(f"adapter {name!r} does not exist: {exc.reason}", param) from None
        except AdapterError:
            raise UnknownAdapter(f"adapter {name!r} does not exist", param) from None
        if info.status is AdapterStatus.FAILED:
            raise GenerationFailed(f"adapter {name!r} failed to load: {info.error}", param)
        return name

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequest("this model has no chat template; use /v1/completions", "messages")
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs
            )
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise InvalidRequest(f"cannot apply the chat template: {exc}", "messages") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def max_new_tokens(self, prompt_len: int, requested: int | None, param: str) -> int:
        """The output budget: what was asked (checked against limits) or the default."""
        room = self.max_model_len - prompt_len
        limit = self.config.server.max_new_tokens
        if requested is None:
            wanted = self.config.server.default_max_new_tokens
            return max(1, min(wanted, room, limit or wanted))
        if requested < 1:
            raise InvalidRequest(f"{param} must be at least 1", param)
        if limit is not None and requested > limit:
            raise InvalidRequest(f"{param}={requested} exceeds this server's limit of {limit}", param)
        if requested > room:
            raise InvalidRequest(
                f"{param}={requested} plus {prompt_len} prompt tokens exceeds the model's context "
                f"length of {self.max_model_len} tokens",
                param,
            )
        return requested

    def check_prompt(self, prompt_ids: list[int], param: str) -> None:
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty", param)
        limit = self.config.server.max_prompt_tokens or (self.max_model_len - 1)
        limit = min(limit, self.max_model_len - 1)
        if len(prompt_ids) > limit:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; this server accepts at most {limit}", param
            )

    def sampling_params(self, **fields) -> SamplingParams:
        try:
            return SamplingParams(**fields)
        except InvalidSamplingParams as exc:
            raise InvalidRequest(str(exc)) from None

    @staticmethod
    def with_seed(params: SamplingParams) -> SamplingParams:
        """A sampled request without a seed gets one, reported back so it can be replayed."""
        if params.greedy or params.seed is not None:
            return params
        return replace(params, seed=random.randrange(2**63))

    # ------------------------------------------------------------------ running

    async def stream(self, generation: Generation, request_id: str) -> AsyncIterator[RequestOutput]:
        """Run one request; raises ServiceError before the first output, or GenerationFailed
        for a request the engine ended with an error. `request_id` (the client's, maybe
        reused) gets a unique suffix in the engine."""
        if self._in_flight >= self.config.server.max_concurrent_requests:
            self.metrics.start_request(generation.endpoint, generation.adapter_id).finish("overloaded")
            raise Overloaded(
                f"{self._in_flight} requests are in flight, the limit is "
                f"{self.config.server.max_concurrent_requests}; retry later"
            )
        timer = self.metrics.start_request(generation.endpoint, generation.adapter_id)
        self._in_flight += 1
        outcome, generated = "abort", 0
        try:
            stream = self.engine.generate(
                f"{request_id}.{next(self._engine_ids)}",
                generation.prompt_token_ids,
                generation.params,
                generation.adapter_id,
            )
            async for output in stream:
                timer.tokens(len(output.new_token_ids))
                generated = output.num_output_tokens
                if output.finished and output.finish_reason is FinishReason.ERROR:
                    outcome = "error"
                    raise GenerationFailed(output.error or "generation failed")
                if output.finished:
                    outcome = output.finish_reason.value if output.finish_reason else "stop"
                yield output
        except EngineDead as exc:
            outcome = "error"
            raise GenerationFailed(str(exc)) from None
        except ValueError as exc:  # the engine refused the request (too long, duplicate id)
            outcome = "invalid"
            raise InvalidRequest(str(exc)) from None
        finally:
            self._in_flight -= 1
            timer.finish(outcome, len(generation.prompt_token_ids), generated)
