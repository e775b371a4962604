"""Between the HTTP routes and the engine: adapters, prompts, limits, seeds, admission, metrics.

Routes turn their own request shapes into a `Generation` and their own error shapes out of
a `ServiceError`; everything they have in common lives here. Template rendering and
tokenization run on worker threads (`render_chat`, `encode_async`): a long prompt must not
stall the event loop that answers everyone else.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

from loramux.adapter_store.errors import AdapterError, InvalidAdapterId
from loramux.adapter_store.store import AdapterStatus
from loramux.scheduler.request import FinishReason
from loramux.scheduler.sampling_params import MAX_LOGIT_BIAS_ENTRIES, InvalidSamplingParams, SamplingParams
from loramux.server.builder import EngineParts
from loramux.server.engine import AsyncEngine, EngineDead
from loramux.server.metrics import ServerMetrics
from loramux.server.outputs import RequestOutput
from loramux.server.structured.compiler import GrammarCompiler
from loramux.server.structured.spec import GrammarError, GrammarSpec
from loramux.server.structured.tools import template_knows_tools

logger = logging.getLogger(__name__)

# What torch.Generator.manual_seed takes is 64 bits; seeds stay in the signed range, so
# that choice j's seed (seed + j) still fits.
MIN_SEED = -(2**63)
MAX_SEED = 2**63 - 1
# A token never spans fewer than 1/16 of a character on any tokenizer we serve, so a
# prompt longer than 16 characters per allowed token cannot fit: refuse it before tokenizing.
CHARS_PER_TOKEN_BOUND = 16
TOKENIZER_THREADS = 2
SAMPLING_EPS = 1e-5


class ServiceError(Exception):
    """An error a client caused or should know about; routes map `kind` to their status codes."""

    kind = "internal"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServiceError):
    kind = "validation"


class InvalidGrammar(InvalidRequest):
    """A response_format / grammar / tools field the grammar engine cannot use: 400 on every route."""

    kind = "invalid_grammar"


@contextmanager
def grammar_errors_are_400():
    """Reading grammar and tool fields: a GrammarError becomes InvalidGrammar (400, its field)."""
    try:
        yield
    except GrammarError as exc:
        raise InvalidGrammar(str(exc), exc.param) from None


class UnknownAdapter(ServiceError):
    kind = "not_found"


class Overloaded(ServiceError):
    kind = "overloaded"


class ShuttingDown(ServiceError):
    """The server is draining (SIGTERM) or its engine is gone: 503, retry elsewhere."""

    kind = "unavailable"


class GenerationFailed(ServiceError):
    kind = "generation"


@dataclass(frozen=True)
class Generation:
    """One request as the engine will run it."""

    prompt_token_ids: list[int]
    params: SamplingParams
    adapter_id: str | None
    endpoint: str  # for metrics: "generate", "chat", "completions"


class Admission:
    """In-flight slots for all of a request's sequences, reserved together before any starts
    (so a request never starts some choices and is refused the rest). Each stream gives its
    slot back when it ends; `release()` gives back the slots of streams that never ran."""

    def __init__(self, service: GenerationService, count: int) -> None:
        self._service = service
        self._left = count

    def release_one(self) -> None:
        if self._left > 0:
            self._left -= 1
            self._service._in_flight -= 1

    def release(self) -> None:
        self._service._in_flight -= self._left
        self._left = 0


class GenerationService:
    def __init__(self, parts: EngineParts, engine: AsyncEngine, metrics: ServerMetrics) -> None:
        self.parts = parts
        self.engine = engine
        self.metrics = metrics
        self.tokenizer = parts.tokenizer
        self.config = parts.config
        self.served_model_name = parts.config.model.served_model_name
        self.max_model_len = parts.core.max_model_len
        self.vocab_size = len(self.tokenizer)
        self._special_ids = frozenset(self.tokenizer.all_special_ids)
        self._in_flight = 0
        self._engine_ids = itertools.count()  # engine ids stay unique when a client reuses X-Request-Id
        self._tokenizer_pool = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="loramux-tokenize")
        self.draining = False  # SIGTERM: refuse new requests, let running ones finish
        self.grammars = GrammarCompiler(self.tokenizer, parts.model.spec.vocab_size, parts.eos_token_ids)

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        self.grammars.close()

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    @property
    def prompt_token_limit(self) -> int:
        limit = self.config.server.max_prompt_tokens or (self.max_model_len - 1)
        return min(limit, self.max_model_len - 1)

    @property
    def prompt_char_limit(self) -> int:
        return self.config.server.max_prompt_chars or self.prompt_token_limit * CHARS_PER_TOKEN_BOUND

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

    def check_prompt_chars(self, text: str, param: str) -> None:
        """The cheap check before tokenizing: a text this long cannot fit the token limit."""
        if len(text) > self.prompt_char_limit:
            raise InvalidRequest(
                f"{param} has {len(text)} characters; this server accepts at most {self.prompt_char_limit}", param
            )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    async def _off_loop(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, function, *args)

    async def encode_async(self, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
        """Check the length, tokenize on a worker thread, check the token count."""
        self.check_prompt_chars(text, param)
        ids = await self._off_loop(self.encode, text, add_special_tokens)
        self.check_prompt(ids, param)
        return ids

    async def encode_async_unchecked(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize on a worker thread (the caller checks the length before and after)."""
        return await self._off_loop(self.encode, text, add_special_tokens)

    async def decode_async(self, token_ids: list[int]) -> str:
        return await self._off_loop(self.tokenizer.decode, token_ids)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    chat_template: str | None = None, **template_kwargs) -> str:
        template = chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InvalidRequest("this model has no chat template; use /v1/completions", "messages")
        try:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                chat_template=chat_template, **template_kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise InvalidRequest(f"cannot apply the chat template: {type(exc).__name__}: {exc}", "messages") from None

    async def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                          chat_template: str | None = None, **template_kwargs) -> list[int]:
        """Messages -> prompt token ids, rendered and tokenized on a worker thread."""
        self.check_prompt_chars("".join(m.get("content") or "" for m in messages), "messages")

        def render() -> list[int]:
            text = self.chat_prompt(messages, add_generation_prompt, chat_template, **template_kwargs)
            self.check_prompt_chars(text, "messages")
            return self.encode(text, add_special_tokens=False)

        ids = await self._off_loop(render)
        self.check_prompt(ids, "messages")
        return ids

    def template_knows_tools(self, chat_template: str | None = None) -> bool:
        return template_knows_tools(chat_template or getattr(self.tokenizer, "chat_template", None))

    async def compile_grammar(self, spec: GrammarSpec | None) -> object | None:
        """The compiled grammar for SamplingParams.grammar (None: free output), compiled at
        admission off the event loop; a grammar it cannot compile is a 400 naming the field."""
        if spec is None:
            return None
        with grammar_errors_are_400():
            return await self.grammars.compile(spec)

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
        limit = self.prompt_token_limit
        if len(prompt_ids) > limit:
            raise InvalidRequest(
                f"the prompt has {len(prompt_ids)} tokens; this server accepts at most {limit}", param
            )

    def check_token_ids(self, token_ids, param: str) -> None:
        """Token ids must be ints the model's vocabulary has."""
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"{param}: token ids must be integers in [0, {self.vocab_size})", param)

    def check_stops(self, stop: tuple[str, ...], stop_token_ids: tuple[int, ...], stop_param: str = "stop",
                    ids_param: str = "stop_token_ids") -> None:
        server = self.config.server
        if len(stop) > server.max_stop_sequences:
            raise InvalidRequest(f"{stop_param}: at most {server.max_stop_sequences} stop sequences", stop_param)
        for text in stop:
            if not text:
                raise InvalidRequest(f"{stop_param}: stop sequences must be non-empty", stop_param)
            if len(text) > server.max_stop_sequence_chars:
                raise InvalidRequest(
                    f"{stop_param}: a stop sequence may have at most {server.max_stop_sequence_chars} characters",
                    stop_param,
                )
        if len(stop_token_ids) > server.max_stop_sequences:
            raise InvalidRequest(f"{ids_param}: at most {server.max_stop_sequences} stop token ids", ids_param)
        self.check_token_ids(stop_token_ids, ids_param)

    @staticmethod
    def check_seed(seed: int | None, param: str = "seed") -> None:
        if seed is not None and not MIN_SEED <= seed <= MAX_SEED:
            raise InvalidRequest(f"{param} must be a 64-bit signed integer", param)

    def check_choices(self, count: int, param: str = "n") -> None:
        """prompts x n: the sequences one request starts."""
        limit = self.config.server.max_choices_per_request
        if count > limit:
            raise InvalidRequest(
                f"this request asks for {count} sequences (prompts x n); this server allows at most {limit}", param
            )

    def logit_bias(self, bias: dict[str, float] | None, param: str = "logit_bias") -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} -> (token id, bias) pairs; ids must be in the vocabulary
        (the values' range is checked with the other sampling parameters)."""
        if not bias:
            return ()
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequest(f"{param} may name at most {MAX_LOGIT_BIAS_ENTRIES} tokens", param)
        pairs = []
        for key, value in bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise InvalidRequest(f"{param} keys must be token ids, got {key[:32]!r}", param) from None
            if not 0 <= token_id < self.vocab_size:
                raise InvalidRequest(f"{param}: token id {token_id} is not in [0, {self.vocab_size})", param)
            pairs.append((token_id, float(value)))
        return tuple(pairs)

    def adapter_scale(self, scale: float | None, adapter_id: str | None, param: str = "adapter_scale") -> float:
        """A request's adapter strength (1.0 when unset); it needs an adapter to scale, and
        not a DoRA one: DoRA's magnitudes normalize the delta at full strength, so a scaled
        DoRA delta is not what peft computes (its weight norm would change with the scale)."""
        if scale is None or scale == 1.0:
            return 1.0
        if adapter_id is None:
            raise InvalidRequest(f"{param} scales an adapter's delta: name an adapter to use it", param)
        try:
            use_dora = self.parts.store.info(adapter_id).use_dora
        except AdapterError:
            use_dora = False  # unknown: the adapter's own check answers 404 for it
        if use_dora:
            raise InvalidRequest(
                f"{param}: adapter {adapter_id!r} is a DoRA adapter, whose magnitudes hold only at full "
                "strength; leave adapter_scale unset (or 1)", param,
            )
        return scale

    def sampling_params(self, **fields) -> SamplingParams:
        server = self.config.server
        if fields.get("repetition_window") is None:  # the server's default guard
            fields["repetition_window"] = server.default_repetition_window
        if fields.get("repetition_max_period") is None:
            fields["repetition_max_period"] = server.default_repetition_max_period
        for name, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number", name)
        self.check_seed(fields.get("seed"))
        temperature = fields.get("temperature")
        if isinstance(temperature, float) and 0.0 < temperature < SAMPLING_EPS:
            fields["temperature"] = 0.0  # as vLLM: logits / 1e-300 overflow; this close to 0 is greedy
        top_k = fields.get("top_k")
        if isinstance(top_k, int) and top_k > self.vocab_size:
            fields["top_k"] = 0  # keeping more tokens than the vocabulary has keeps all of them
        try:
            return SamplingParams(**fields)
        except InvalidSamplingParams as exc:
            message = str(exc)
            raise InvalidRequest(message, message.split(" ", 1)[0]) from None
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidRequest(f"invalid sampling parameters: {exc}") from None

    @staticmethod
    def with_seed(params: SamplingParams) -> SamplingParams:
        """A sampled request without a seed gets one, reported back so it can be replayed."""
        if params.greedy or params.seed is not None:
            return params
        return replace(params, seed=random.randrange(2**63))

    def _adapter_version(self, adapter_id: str | None) -> int | None:
        """The adapter's current version (None: base, or no such adapter now)."""
        if adapter_id is None:
            return None
        try:
            return self.parts.store.info(adapter_id).version
        except AdapterError:
            return None

    def _gone_since(self, adapter_id: str | None, version: int | None) -> bool:
        """Deleted since `version` was current, even if an upload has put the id back since
        (then the version differs): the request came to run while its adapter was gone."""
        if adapter_id is None:
            return False
        return version is None or self._adapter_version(adapter_id) != version

    # ------------------------------------------------------------------ admission

    def admit(self, count: int, endpoint: str, adapter_id: str | None) -> Admission:
        """Reserve in-flight slots for all `count` sequences of one request, or refuse it
        whole (503 while draining, 429 when full) before anything starts."""
        if self.draining or not self.engine.is_alive:
            self.metrics.start_request(endpoint, adapter_id).finish("unavailable")
            raise ShuttingDown("the server is shutting down; retry on another replica")
        limit = self.config.server.max_concurrent_requests
        if self._in_flight + count > limit:
            self.metrics.start_request(endpoint, adapter_id).finish("overloaded")
            raise Overloaded(f"{self._in_flight} sequences are in flight, the limit is {limit}; retry later")
        self._in_flight += count
        return Admission(self, count)

    async def drain(self, timeout_s: float, poll_s: float = 0.05) -> int:
        """SIGTERM: refuse new requests; give running ones `timeout_s` to finish, then end
        the rest (finish_reason "abort", each with its final event). Returns how many were
        ended early."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self._in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        aborted = self.engine.abort_all() if self.engine.is_alive else 0
        if aborted:
            logger.warning("drain bound of %.1f s reached: ending %d running requests", timeout_s, aborted)
        deadline = time.monotonic() + 5.0  # the final events flush
        while self._in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return aborted

    # ------------------------------------------------------------------ running

    async def stream(self, generation: Generation, request_id: str,
                     admission: Admission | None = None) -> AsyncIterator[RequestOutput]:
        """Run one request; raises ServiceError before the first output, or GenerationFailed
        for a request the engine ended with an error. `request_id` (the client's, maybe
        reused) gets a unique suffix in the engine. `admission`: this stream's reserved slot
        (None: reserve one here)."""
        if admission is None:
            admission = self.admit(1, generation.endpoint, generation.adapter_id)
        timer = self.metrics.start_request(generation.endpoint, generation.adapter_id)
        admitted_version = self._adapter_version(generation.adapter_id)
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
                    if output.num_output_tokens == 0 and self._gone_since(generation.adapter_id, admitted_version):
                        # deleted between admission and its first step: the client named an
                        # adapter that is gone, which is a 404, not a server failure
                        raise UnknownAdapter(f"adapter {generation.adapter_id!r} was deleted", "adapter_id")
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
            admission.release_one()
            timer.finish(outcome, len(generation.prompt_token_ids), generated)
