"""OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models.

`model` names the adapter (the base model's id or "" means base). Errors use vLLM's shape
`{"error": {"message", "type", "param", "code"}}`; an unknown model is a 404.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from loramux.scheduler.output import TokenLogprobs
from loramux.scheduler.request import FinishReason
from loramux.server.api.auth import check_api_key
from loramux.server.api.request_fields import KEEP_UNKNOWN, refuse_unknown_fields
from loramux.server.api.redact import redact_paths
from loramux.server.api.context import cancel_on_disconnect, current_request_id, get_service
from loramux.server.api.sse import sse_event, sse_response, start_stream
from loramux.server.merge_request import resolve_adapter_or_merge
from loramux.server.outputs import RequestOutput
from loramux.server.service import (
    Admission,
    Generation,
    GenerationService,
    InvalidRequest,
    ServiceError,
    grammar_errors_are_400,
)
from loramux.server.structured.spec import from_response_format, from_structured_outputs, one_of
from loramux.server.structured.tools import (
    ToolCallParser,
    ToolCalling,
    check_history,
    parse_tool_calling,
    parse_tool_calls,
    render_history,
)

router = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

STATUS = {"validation": 400, "forbidden": 403, "not_found": 404, "too_large": 413, "overloaded": 429,
          "unavailable": 503, "generation": 500, "internal": 500, "invalid_grammar": 400}
TYPES = {
    "validation": "BadRequestError",
    "invalid_grammar": "BadRequestError",
    "forbidden": "PermissionDeniedError",
    "not_found": "NotFoundError",
    "overloaded": "RateLimitError",
    "unavailable": "ServiceUnavailableError",
    "too_large": "BadRequestError",
    "generation": "InternalServerError",
    "internal": "InternalServerError",
}
MAX_N = 16
SCALARS = (str, int, float, bool, type(None))


class OpenAIError(Exception):
    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


def openai_error_body(error: ServiceError, status: int | None = None) -> dict:
    status = status or STATUS.get(error.kind, 500)
    message = redact_paths(error.message)
    kind = TYPES.get(error.kind, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": error.param, "code": status}}


def openai_error_response(error: ServiceError, status: int | None = None) -> JSONResponse:
    status = status or STATUS.get(error.kind, 500)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(openai_error_body(error, status), status_code=status, headers=headers)


# --------------------------------------------------------------------------- requests


class StreamOptions(BaseModel):
    model_config = KEEP_UNKNOWN

    include_usage: bool = False


class SamplingFields(BaseModel):
    """What chat and completions requests share (OpenAI fields plus vLLM's extras)."""

    model_config = KEEP_UNKNOWN  # unknown fields: 400 naming them (request_fields.py)

    model: str = ""
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    typical_p: float | None = None
    logit_bias: dict[str, float] | None = None  # {"token id": bias in [-100, 100]}
    # loramux's extras (the SDK's extra_body): the adapter's strength, the repetition guard
    adapter_scale: float | None = None
    repetition_window: int | None = None  # None: the server's --default-repetition-window
    repetition_max_period: int | None = None
    # LoRAX's adapter composition, as an extra body field (server/merge_request.py)
    merged_adapters: dict[str, Any] | None = None


class StructuredFields(BaseModel):
    """Constrained output (server/structured): OpenAI's response_format, vLLM's structured_outputs."""

    response_format: dict | None = None
    structured_outputs: dict | None = None  # {"json": schema} or {"regex": pattern}

    def grammar_spec(self):
        return one_of(from_response_format(self.response_format), from_structured_outputs(self.structured_outputs))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call they answer


class ChatCompletionRequest(SamplingFields, StructuredFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    # Client templates are code-like Jinja: refused unless --trust-request-chat-template.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields, StructuredFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


# --------------------------------------------------------------------------- shared


def _fail(message: str, param: str | None) -> OpenAIError:
    return OpenAIError(InvalidRequest(message, param))


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


async def _resolve_model(service: GenerationService, body: SamplingFields) -> str | None:
    model = body.model
    try:
        return await resolve_adapter_or_merge(service, model, body.merged_adapters, "model")
    except ServiceError as exc:
        if exc.kind == "not_found" and exc.param == "model":
            exc.message = f"The model `{model}` does not exist."
        raise OpenAIError(exc) from None


def _refuse_unknown(body: SamplingFields) -> None:
    try:
        refuse_unknown_fields(body)
        if body.stream_options is not None:
            refuse_unknown_fields(body.stream_options, "stream_options.")
    except ServiceError as exc:
        raise OpenAIError(exc) from None


def _params(service: GenerationService, body: SamplingFields, prompt_len: int, max_tokens: int | None,
            max_param: str, logprobs: int | None, prompt_logprobs: int | None, adapter: str | None):
    if not 1 <= body.n <= MAX_N:
        raise _fail(f"n must be between 1 and {MAX_N}", "n")
    stop = _stops(body.stop)
    stop_token_ids = tuple(body.stop_token_ids or ())
    try:
        service.check_stops(stop, stop_token_ids)
        params = service.sampling_params(
            max_tokens=service.max_new_tokens(prompt_len, max_tokens, max_param),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k in (None, -1) else body.top_k,  # vLLM: -1 = off
            min_p=body.min_p or 0.0,
            typical_p=1.0 if body.typical_p is None else body.typical_p,
            logit_bias=service.logit_bias(body.logit_bias),
            adapter_scale=service.adapter_scale(body.adapter_scale, adapter),
            repetition_window=body.repetition_window,
            repetition_max_period=body.repetition_max_period,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop=stop,
            include_stop_str_in_output=body.include_stop_str_in_output,
            stop_token_ids=stop_token_ids,
            ignore_eos=body.ignore_eos,
            min_tokens=body.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ServiceError as exc:
        raise OpenAIError(exc) from None
    return params


def _finish_reason(output: RequestOutput) -> str:
    if output.finish_reason is FinishReason.STOP:
        return "stop"
    if output.finish_reason is FinishReason.ABORT:
        return "abort"
    return "length"  # max tokens, context length, or the repetition guard's cut


def _stop_reason(output: RequestOutput) -> int | str | None:
    if output.finish_reason is FinishReason.REPETITION:
        return "repetition"
    return output.stop_reason


@dataclass
class _Choice:
    """One choice's outputs, accumulated."""

    index: int
    generation: Generation
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    last: RequestOutput | None = None

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids += output.new_token_ids
        self.logprobs += output.new_logprobs
        self.prompt_logprobs += output.prompt_logprobs
        self.last = output


def _generations(service: GenerationService, prompts: list[list[int]], make_params, adapter: str | None,
                 endpoint: str, n: int) -> list[Generation]:
    """n choices per prompt; a seeded request gives choice j the seed + j (reproducible, distinct)."""
    generations = []
    for prompt in prompts:
        params = make_params(len(prompt))
        for j in range(n):
            choice_params = params
            if params.seed is not None and j:
                choice_params = replace(params, seed=params.seed + j)
            generations.append(Generation(prompt, choice_params, adapter, endpoint))
    return generations


async def _run_all(service: GenerationService, generations: list[Generation], request_id: str,
                   admission: Admission) -> list[_Choice]:
    """Run every choice; the first that fails cancels its siblings (which frees their KV
    blocks at once) and its error is the request's."""
    choices = [_Choice(i, g) for i, g in enumerate(generations)]

    async def run(choice: _Choice) -> None:
        async for output in service.stream(choice.generation, f"{request_id}-{choice.index}", admission):
            choice.add(output)

    tasks = [asyncio.create_task(run(c)) for c in choices]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t.exception() for t in done if t.exception() is not None), None)
        if failed is not None:
            raise failed
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return choices


async def _merged(service: GenerationService, generations: list[Generation], request_id: str,
                  admission: Admission) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all choices as they come, tagged with the choice index; the first error
    ends them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for output in service.stream(generation, f"{request_id}-{index}", admission):
                await queue.put((index, output))
        except ServiceError as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, ServiceError):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()  # a client that went away aborts every choice


async def _start_choices(request: Request, service: GenerationService, generations: list[Generation],
                         request_id: str, admission: Admission):
    """A stream's choices, merged, once each has its first output: a request that fails
    before any output (its adapter deleted while it queued) gets its error status before
    the stream's 200. Returns the outputs and the response's on_close."""
    merged = _merged(service, generations, request_id, admission)
    return await start_stream(request, merged, len(generations), key=lambda item: item[0], release=admission.release)


def _usage(choices_prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": choices_prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": choices_prompt_tokens + completion_tokens,
    }


def _prompt_tokens(generations: list[Generation], n: int) -> int:
    return sum(len(g.prompt_token_ids) for g in generations[::n])


# --------------------------------------------------------------------------- chat


def _chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages as the template sees them: text content parts joined, extra fields scalar."""
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if part.get("type") != "text":
                    raise _fail(f"{where}: only text content parts are supported", "messages")
                if not isinstance(part.get("text"), str):
                    raise _fail(f"{where}.text must be a string", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        extra = message.model_extra or {}
        for key, value in extra.items():
            if not isinstance(value, SCALARS):
                raise _fail(f"messages[{i}].{key} must be a string, number or boolean", "messages")
        messages.append({**message.model_dump(exclude_none=True), "role": message.role, "content": content or ""})
    return messages


def _template_kwargs(service: GenerationService, body: ChatCompletionRequest) -> dict:
    """chat_template and non-scalar chat_template_kwargs values need the trust flag: a
    template is a program, and nested values reach its loops."""
    kwargs = body.chat_template_kwargs or {}
    if service.config.server.trust_request_chat_template:
        return kwargs
    if body.chat_template is not None:
        raise _fail("chat_template is refused: this server does not run client templates "
                    "(start it with --trust-request-chat-template to allow them)", "chat_template")
    for key, value in kwargs.items():
        if not isinstance(value, SCALARS):
            raise _fail(f"chat_template_kwargs.{key} must be a string, number, boolean or null "
                        "(start the server with --trust-request-chat-template to allow others)",
                        "chat_template_kwargs")
    return kwargs


def _chat_logprobs(service: GenerationService, logprobs: list[TokenLogprobs]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = service.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]} for lp in logprobs
        ]
    }


async def _chat_generations(service: GenerationService,
                            body: ChatCompletionRequest) -> tuple[list[Generation], ToolCalling | None]:
    _refuse_unknown(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise _fail("top_logprobs needs logprobs=true", "top_logprobs")
    if not 1 <= body.n <= MAX_N:
        raise _fail(f"n must be between 1 and {MAX_N}", "n")
    service.check_choices(body.n)
    adapter = await _resolve_model(service, body)
    messages = _chat_messages(body)
    with grammar_errors_are_400():
        calling = parse_tool_calling(body.tools, body.tool_choice, body.parallel_tool_calls)
        check_history(messages)
        fmt = body.grammar_spec()
        # tool_choice "auto" beside a response_format: the format constrains, calls are still read.
        tool_grammar = calling.grammar_spec() if calling and not (fmt and calling.choice == "auto") else None
        spec = one_of(fmt, tool_grammar)
    kwargs = _template_kwargs(service, body)
    messages, tool_kwargs = render_history(messages, calling, service.template_knows_tools(body.chat_template))
    prompt = await service.render_chat(messages, body.add_generation_prompt, body.chat_template,
                                       **{**kwargs, **tool_kwargs})
    grammar = await service.compile_grammar(spec)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    generations = _generations(
        service, [prompt],
        lambda n: service.with_seed(replace(_params(service, body, n, max_tokens, param, logprobs, None, adapter),
                                            grammar=grammar)),
        adapter, "chat", body.n,
    )
    return generations, calling


def _chat_reply(text: str, calling: ToolCalling | None) -> dict:
    """The assistant message: tool calls read out of the text when tools were offered."""
    if calling is None:
        return {"role": "assistant", "content": text}
    content, calls = parse_tool_calls(text, calling.names())
    return {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}


def _tool_delta(parser: ToolCallParser, text: str, finished: bool) -> dict:
    content, calls = parser.feed(text)
    if finished:
        content += parser.finish()
    delta: dict = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = calls
    return delta


@router.post("/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest,
                           service: GenerationService = Depends(get_service)):
    generations, calling = await _chat_generations(service, body)
    request_id = current_request_id()
    created = int(time.time())
    response_id = f"chatcmpl-{request_id}"
    model = body.model or service.served_model_name
    # All choices' slots, reserved before any starts: a full server answers 429 here,
    # before a stream's 200.
    admission = service.admit(len(generations), "chat", generations[0].adapter_id)
    if body.stream:
        outputs, on_close = await _start_choices(request, service, generations, request_id, admission)
        return sse_response(_chat_stream(service, body, generations, outputs, response_id, created, model, calling),
                            on_close=on_close)
    try:
        choices = await cancel_on_disconnect(request, _run_all(service, generations, request_id, admission))
    finally:
        admission.release()
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": c.index,
                **_with_reply(_chat_reply(c.text, calling), c.last),
                "logprobs": _chat_logprobs(service, c.logprobs) if body.logprobs else None,
            }
            for c in choices
        ],
        "usage": _usage(_prompt_tokens(generations, body.n), sum(len(c.token_ids) for c in choices)),
    }


async def _chat_stream(service, body, generations, outputs: AsyncIterator[tuple[int, RequestOutput]], response_id, created,
                       model, calling: ToolCalling | None) -> AsyncIterator[str]:
    parsers = [ToolCallParser(calling.names()) for _ in generations] if calling else None

    async def choices(counter: list[int]) -> AsyncIterator[dict]:
        for index in range(len(generations)):
            yield {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                   "finish_reason": None}
        async for index, output in outputs:
            counter[0] += len(output.new_token_ids)
            delta = {"content": output.new_text} if output.new_text else {}
            if parsers:  # tool calls are sent as whole calls once their block closes
                delta = _tool_delta(parsers[index], output.new_text, output.finished)
            if not delta and not output.finished and not (body.logprobs and output.new_logprobs):
                continue
            yield {
                "index": index,
                "delta": delta,
                "logprobs": _chat_logprobs(service, output.new_logprobs) if body.logprobs else None,
                **_finish_fields(output, bool(parsers and parsers[index].calls)),
            }

    header = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": model}
    async for event in _sse_chunks(body, header, generations, choices):
        yield event


def _finish_fields(output: RequestOutput, called_tools: bool = False) -> dict:
    if not output.finished:
        return {"finish_reason": None}
    reason = _finish_reason(output)
    if called_tools and reason == "stop":  # the model ended its turn on tool calls
        reason = "tool_calls"
    return {"finish_reason": reason, "stop_reason": _stop_reason(output)}


def _with_reply(message: dict, last: RequestOutput) -> dict:
    """A chat choice's message and finish fields."""
    return {"message": message, **_finish_fields(last, bool(message.get("tool_calls")))}


async def _sse_chunks(body: SamplingFields, header: dict, generations: list[Generation], choices) -> AsyncIterator[str]:
    """The OpenAI stream framing: one chunk per choice event, an error event if the run
    fails, a usage chunk when asked for, then [DONE]. `choices(counter)` yields choice
    dicts and adds the tokens it sees to counter[0]."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choice_list: list[dict], usage: dict | None = None) -> str:
        payload = {**header, "choices": choice_list}
        if include_usage:
            payload["usage"] = usage
        return sse_event(payload)

    counter = [0]
    try:
        async for choice in choices(counter):
            yield chunk([choice])
    except ServiceError as exc:
        yield sse_event(openai_error_body(exc))
        yield sse_event("[DONE]")
        return
    if include_usage:
        yield chunk([], _usage(_prompt_tokens(generations, body.n), counter[0]))
    yield sse_event("[DONE]")


# --------------------------------------------------------------------------- completions


async def _completion_prompts(service: GenerationService, prompt, n: int) -> list[list[int]]:
    """Prompts as token ids; the count (x n) and each text's length are checked before
    anything is tokenized, and tokenizing runs on a worker thread."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise _fail("prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    service.check_choices(len(prompt) * n, "prompt" if len(prompt) > 1 else "n")
    if all(isinstance(p, str) for p in prompt):
        for p in prompt:
            service.check_prompt_chars(p, "prompt")
        return [await service.encode_async(p, "prompt") for p in prompt]
    if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
        for p in prompt:
            service.check_token_ids(p, "prompt")
            service.check_prompt(p, "prompt")
        return [list(p) for p in prompt]
    raise _fail("prompt must be a string, a list of strings, or token ids", "prompt")


def _completion_logprobs(service: GenerationService, entries: list[tuple[int, TokenLogprobs | None]],
                         text_start: int = 0) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_start
    for token_id, lp in entries:
        text = service.token_text(token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(None if lp is None else lp.logprob)
        top.append(None if lp is None else {service.token_text(i): v for i, v in lp.top})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


async def _completion_generations(service: GenerationService, body: CompletionRequest) -> list[Generation]:
    _refuse_unknown(body)
    if body.suffix:
        raise _fail("suffix is not supported", "suffix")
    if body.best_of not in (None, body.n):
        raise _fail("best_of must equal n (or be omitted)", "best_of")
    if not 1 <= body.n <= MAX_N:
        raise _fail(f"n must be between 1 and {MAX_N}", "n")
    adapter = await _resolve_model(service, body)
    with grammar_errors_are_400():
        spec = body.grammar_spec()
    prompts = await _completion_prompts(service, body.prompt, body.n)
    grammar = await service.compile_grammar(spec)
    prompt_logprobs = body.logprobs if (body.echo and body.logprobs is not None) else None
    return _generations(
        service, prompts,
        lambda n: service.with_seed(replace(
            _params(service, body, n, body.max_tokens, "max_tokens", body.logprobs, prompt_logprobs, adapter),
            grammar=grammar,
        )),
        adapter, "completions", body.n,
    )


@router.post("/completions")
async def completions(request: Request, body: CompletionRequest,
                      service: GenerationService = Depends(get_service)):
    generations = await _completion_generations(service, body)
    request_id = current_request_id()
    created = int(time.time())
    response_id = f"cmpl-{request_id}"
    model = body.model or service.served_model_name
    admission = service.admit(len(generations), "completions", generations[0].adapter_id)
    if body.stream:
        outputs, on_close = await _start_choices(request, service, generations, request_id, admission)
        return sse_response(_completion_stream(service, body, generations, outputs, response_id, created, model),
                            on_close=on_close)
    try:
        choices = await cancel_on_disconnect(request, _run_all(service, generations, request_id, admission))
    finally:
        admission.release()
    out = []
    for c in choices:
        prompt_text = await service.decode_async(c.generation.prompt_token_ids) if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            entries: list[tuple[int, TokenLogprobs | None]] = []
            if body.echo:
                ids = c.generation.prompt_token_ids
                entries = [(ids[0], None)] + [(lp.token_id, lp) for lp in c.prompt_logprobs]
            entries += [(lp.token_id, lp) for lp in c.logprobs]
            logprobs = _completion_logprobs(service, entries)
        out.append({
            "index": c.index,
            "text": prompt_text + c.text,
            "logprobs": logprobs,
            "finish_reason": _finish_reason(c.last),
            "stop_reason": _stop_reason(c.last),
        })
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": out,
        "usage": _usage(_prompt_tokens(generations, body.n), sum(len(c.token_ids) for c in choices)),
    }


async def _completion_stream(service, body, generations, outputs: AsyncIterator[tuple[int, RequestOutput]],
                             response_id, created, model) -> AsyncIterator[str]:
    async def choices(counter: list[int]) -> AsyncIterator[dict]:
        echoed: set[int] = set()
        async for index, output in outputs:
            counter[0] += len(output.new_token_ids)
            text = output.new_text
            if body.echo and index not in echoed:
                echoed.add(index)
                text = await service.decode_async(generations[index].prompt_token_ids) + text
            if not text and not output.finished:
                continue
            logprobs = None
            if body.logprobs is not None and output.new_logprobs:
                logprobs = _completion_logprobs(service, [(lp.token_id, lp) for lp in output.new_logprobs])
            yield {"index": index, "text": text, "logprobs": logprobs, **_finish_fields(output)}

    header = {"id": response_id, "object": "text_completion", "created": created, "model": model}
    async for event in _sse_chunks(body, header, generations, choices):
        yield event


# --------------------------------------------------------------------------- models


@router.get("/models")
async def list_models(service: GenerationService = Depends(get_service)):
    created = int(time.time())
    base = service.served_model_name
    data = [{
        "id": base, "object": "model", "created": created, "owned_by": "loramux", "root": base,
        "parent": None, "max_model_len": service.max_model_len,
    }]
    for info in service.parts.store.list():
        data.append({
            "id": info.adapter_id, "object": "model", "created": created, "owned_by": "loramux",
            "root": info.adapter_id, "parent": base, "max_model_len": service.max_model_len,
        })
    return {"object": "list", "data": data}
