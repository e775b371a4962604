"""LoRAX/TGI-compatible API: /generate, /generate_stream, / (either), /info, /health.

`lorax-client` and TGI clients work unmodified: non-streaming `POST /` returns a JSON array
of one object, streams are `data:{json}` events without a [DONE] marker, and errors are
`{"error": msg, "error_type": ...}` with LoRAX's status codes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from loramux.scheduler.output import TokenLogprobs
from loramux.scheduler.request import FinishReason
from loramux.scheduler.sampling_params import MAX_TOP_LOGPROBS
from loramux.server.api.auth import check_api_key
from loramux.server.api.redact import redact_paths
from loramux.server.api.request_fields import KEEP_UNKNOWN, refuse_unknown_fields
from loramux.server.api.context import cancel_on_disconnect, current_request_id, get_service
from loramux.server.api.sse import sse_event, sse_response, start_stream
from loramux.server.merge_request import resolve_adapter_or_merge
from loramux.server.outputs import RequestOutput
from loramux.server.service import (
    MAX_SEED,
    Admission,
    Generation,
    GenerationService,
    InvalidRequest,
    ServiceError,
    ShuttingDown,
    grammar_errors_are_400,
)
from loramux.server.structured.spec import from_response_format, from_tgi_grammar, one_of

router = APIRouter()

STATUS = {"validation": 422, "forbidden": 403, "not_found": 404, "too_large": 413, "overloaded": 429,
          "unavailable": 503, "generation": 424, "internal": 500,
          "invalid_grammar": 400}  # a grammar that cannot be compiled: 400 on every route


class TgiError(Exception):
    """A ServiceError on a TGI route, rendered as LoRAX renders errors."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(error.message)
        self.error = error


def tgi_error_body(error: ServiceError) -> dict:
    return {"error": redact_paths(error.message), "error_type": error.kind}


def tgi_error_response(error: ServiceError, status: int | None = None) -> JSONResponse:
    status = status or STATUS.get(error.kind, 500)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(tgi_error_body(error), status_code=status, headers=headers)


class TgiParameters(BaseModel):
    model_config = KEEP_UNKNOWN  # unknown fields: 422 naming them (request_fields.py)

    adapter_id: str | None = None
    adapter_source: str | None = None
    merged_adapters: dict | None = None
    api_token: str | None = None
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos_token: bool = False
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: list[str] | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    min_p: float | None = None
    truncate: int | None = None
    watermark: bool = False
    response_format: dict | None = None
    return_k_alternatives: int | None = None
    top_n_tokens: int | None = None  # TGI: the n most likely tokens at each step, in details
    grammar: dict | None = None  # TGI: {"type": "json" | "regex", "value": ...}
    # loramux's extras: the adapter's strength, the repetition guard
    adapter_scale: float | None = None
    repetition_window: int | None = None  # None: the server's --default-repetition-window
    repetition_max_period: int | None = None


class TgiRequest(BaseModel):
    model_config = KEEP_UNKNOWN

    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False


def _refuse_unsupported(body: TgiRequest) -> None:
    p = body.parameters
    refuse_unknown_fields(body)
    refuse_unknown_fields(p, "parameters.")
    if p.api_token is not None:
        raise InvalidRequest("api_token is not used: adapters are served from this server's registry", "api_token")
    if p.watermark:
        raise InvalidRequest("watermark is not supported", "watermark")
    if p.adapter_source not in (None, "", "hub"):
        raise InvalidRequest(
            f"adapter_source {p.adapter_source!r} is not supported: adapters are served by id from "
            "this server's registry (upload one with POST /v1/adapters)",
            "adapter_source",
        )


def _is_sampling(p: TgiParameters) -> bool:
    """TGI: any sampling knob turns sampling on; temperature 0 means greedy."""
    sample = p.do_sample or any(
        (p.temperature not in (None, 1.0), p.top_k not in (None, 0), p.top_p not in (None, 1.0),
         p.typical_p not in (None, 1.0), p.min_p not in (None, 0.0))
    )
    return sample and p.temperature != 0


def _check_best_of(service: GenerationService, body: TgiRequest, stream: bool) -> int:
    """TGI's rules: best_of > 1 samples, picks its own seeds and does not stream."""
    p = body.parameters
    best_of = 1 if p.best_of is None else p.best_of
    if best_of < 1:
        raise InvalidRequest("best_of must be at least 1", "best_of")
    if best_of == 1:
        return 1
    if not _is_sampling(p):
        raise InvalidRequest("best_of > 1 needs sampling (do_sample or a sampling parameter)", "best_of")
    if p.seed is not None:
        raise InvalidRequest("seed must not be set when best_of > 1 (each sequence gets its own)", "best_of")
    if stream or body.stream:
        raise InvalidRequest("best_of > 1 is not supported when streaming", "best_of")
    service.check_choices(best_of, "best_of")
    return best_of


def _top_n_tokens(p: TgiParameters) -> int:
    n = p.top_n_tokens or 0
    if not 0 <= n <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_n_tokens must be between 0 and {MAX_TOP_LOGPROBS}", "top_n_tokens")
    return n


async def build_generations(service: GenerationService, body: TgiRequest, stream: bool) -> list[Generation]:
    """The request's sequences: one, or best_of with a seed each."""
    _refuse_unsupported(body)
    best_of = _check_best_of(service, body, stream)
    generation = await build_generation(service, body)
    return [replace(generation, params=service.with_seed(generation.params)) for _ in range(best_of)]


async def build_generation(service: GenerationService, body: TgiRequest) -> Generation:
    p = body.parameters
    adapter = await resolve_adapter_or_merge(service, p.adapter_id, p.merged_adapters)
    with grammar_errors_are_400():
        grammar_spec = one_of(from_response_format(p.response_format), from_tgi_grammar(p.grammar))
    stop = tuple(p.stop or ())
    service.check_stops(stop, ())
    if p.truncate is not None:
        if p.truncate < 1:
            raise InvalidRequest("truncate must be at least 1", "truncate")
        service.check_prompt_chars(body.inputs, "inputs")
        prompt = (await service.encode_async_unchecked(body.inputs))[-p.truncate :]
        service.check_prompt(prompt, "inputs")
    else:
        prompt = await service.encode_async(body.inputs, "inputs")
    if p.temperature is not None and p.temperature < 0:
        raise InvalidRequest("temperature must be >= 0", "temperature")
    temperature = (p.temperature or 1.0) if _is_sampling(p) else 0.0
    top = max(p.return_k_alternatives or 0, _top_n_tokens(p))
    params = service.sampling_params(
        max_tokens=service.max_new_tokens(len(prompt), p.max_new_tokens, "max_new_tokens"),
        temperature=temperature,
        top_p=p.top_p if p.top_p is not None else 1.0,
        top_k=p.top_k or 0,
        min_p=p.min_p or 0.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        presence_penalty=p.presence_penalty or 0.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed,
        stop=stop,
        ignore_eos=p.ignore_eos_token,
        logprobs=top,  # every token carries a numeric logprob
        prompt_logprobs=(p.return_k_alternatives or 0) if p.decoder_input_details else None,
        adapter_scale=service.adapter_scale(p.adapter_scale, adapter),
        repetition_window=p.repetition_window,
        repetition_max_period=p.repetition_max_period,
    )
    params = replace(params, grammar=await service.compile_grammar(grammar_spec))
    return Generation(prompt, params, adapter, "generate")


def finish_reason(output: RequestOutput) -> str:
    if output.finish_reason is FinishReason.STOP:
        return "stop_sequence" if isinstance(output.stop_reason, str) else "eos_token"
    return "length"  # max tokens, context length, or the repetition guard's cut


def _finish_details(output: RequestOutput) -> dict:
    """finish_reason, and for the repetition guard's cut a stop_reason saying why."""
    details = {"finish_reason": finish_reason(output)}
    if output.finish_reason is FinishReason.REPETITION:
        details["stop_reason"] = "repetition"
    return details


def _alternatives(service: GenerationService, lp: TokenLogprobs | None, count: int) -> list[dict]:
    return [{"id": i, "text": service.token_text(i), "logprob": v} for i, v in (lp.top[:count] if lp else ())]


def token_json(service: GenerationService, token_id: int, text: str, lp: TokenLogprobs | None, k: int | None) -> dict:
    token = {
        "id": token_id,
        "text": text,
        "logprob": lp.logprob if lp is not None else 0.0,
        "special": service.is_special(token_id),
        "skipped": False,
    }
    if k:
        token["alternative_tokens"] = _alternatives(service, lp, k)
    return token


def top_tokens_json(service: GenerationService, lp: TokenLogprobs | None, n: int) -> list[dict]:
    """TGI's top_tokens entry of one step: the n most likely tokens."""
    return [{**alt, "special": service.is_special(alt["id"])} for alt in _alternatives(service, lp, n)]


def prefill_json(service: GenerationService, generation: Generation, prompt_logprobs: list[TokenLogprobs]) -> list[dict]:
    ids = generation.prompt_token_ids
    first = [{"id": ids[0], "text": service.token_text(ids[0]), "logprob": None}]
    return first + [
        {"id": lp.token_id, "text": service.token_text(lp.token_id), "logprob": lp.logprob} for lp in prompt_logprobs
    ]


@dataclass
class _Sequence:
    """One sequence's outputs, accumulated to its end."""

    generation: Generation
    text: str = ""
    tokens: list[dict] = field(default_factory=list)
    top_tokens: list[list[dict]] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    logprob_sum: float = 0.0  # best_of ranks sequences by it
    last: RequestOutput | None = None

    def details(self, service: GenerationService, p: TgiParameters) -> dict:
        details = {
            **_finish_details(self.last),
            "generated_tokens": self.last.num_output_tokens,
            "seed": self.generation.params.seed if not self.generation.params.greedy else None,
            "prefill": prefill_json(service, self.generation, self.prompt_logprobs) if p.decoder_input_details else [],
            "tokens": self.tokens,
        }
        if p.top_n_tokens:
            details["top_tokens"] = self.top_tokens
        return details

    def generated_text(self, body: TgiRequest) -> str:
        return (body.inputs + self.text) if body.parameters.return_full_text else self.text


async def _collect(service: GenerationService, body: TgiRequest, generation: Generation, request_id: str,
                   admission: Admission) -> _Sequence:
    p = body.parameters
    sequence = _Sequence(generation)
    async for output in service.stream(generation, request_id, admission):
        sequence.text += output.new_text
        sequence.prompt_logprobs += output.prompt_logprobs
        for token_id, lp in zip(output.new_token_ids, output.new_logprobs or [None] * len(output.new_token_ids)):
            sequence.tokens.append(token_json(service, token_id, output.new_text, lp, p.return_k_alternatives))
            if p.top_n_tokens:
                sequence.top_tokens.append(top_tokens_json(service, lp, p.top_n_tokens))
            sequence.logprob_sum += lp.logprob if lp is not None else 0.0
        sequence.last = output
    return sequence


async def _generate(service: GenerationService, body: TgiRequest, generations: list[Generation],
                    admission: Admission) -> dict:
    """Run every sequence (best_of of them at once) and answer with the most likely one
    (highest cumulative logprob); the others go to details.best_of_sequences (LoRAX)."""
    request_id = current_request_id()
    ids = [request_id] if len(generations) == 1 else [f"{request_id}-{i}" for i in range(len(generations))]
    try:
        async with asyncio.TaskGroup() as group:  # the first failure cancels the siblings
            tasks = [group.create_task(_collect(service, body, g, i, admission)) for g, i in zip(generations, ids)]
    except ExceptionGroup as failed:
        raise failed.exceptions[0] from None
    sequences = [t.result() for t in tasks]
    best = max(range(len(sequences)), key=lambda i: sequences[i].logprob_sum)
    chosen = sequences[best]
    p = body.parameters
    response: dict = {"generated_text": chosen.generated_text(body)}
    if p.details or p.decoder_input_details:
        response["details"] = {
            **chosen.details(service, p),
            "prompt_tokens": len(chosen.generation.prompt_token_ids),
            "skipped_tokens": 0,
        }
        if len(sequences) > 1:
            response["details"]["best_of_sequences"] = [
                {"generated_text": s.generated_text(body), **s.details(service, p)}
                for i, s in enumerate(sequences) if i != best
            ]
    return response


async def _stream_events(service: GenerationService, body: TgiRequest, generation: Generation,
                         outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[str]:
    text = ""
    p = body.parameters
    try:
        async for output in outputs:
            text += output.new_text
            if not output.new_token_ids:
                continue
            lp = output.new_logprobs[0] if output.new_logprobs else None
            event = {
                "token": token_json(service, output.new_token_ids[0], output.new_text, lp, p.return_k_alternatives),
                "generated_text": None,
                "details": None,
            }
            if p.top_n_tokens:
                event["top_tokens"] = top_tokens_json(service, lp, p.top_n_tokens)
            if output.finished:
                event["generated_text"] = (body.inputs + text) if p.return_full_text else text
                event["details"] = {
                    **_finish_details(output),
                    "prompt_tokens": len(generation.prompt_token_ids),
                    "generated_tokens": output.num_output_tokens,
                    "seed": generation.params.seed if not generation.params.greedy else None,
                }
            yield sse_event(event, space=False)
    except ServiceError as exc:
        yield sse_event(tgi_error_body(exc), space=False)


async def _run(request: Request, body: TgiRequest, service: GenerationService, stream: bool):
    """Validation, admission (429/503) and the first output happen before the response
    starts: a stream that cannot run gets a plain 4xx/5xx, never an error event after a 200."""
    try:
        generations = await build_generations(service, body, stream)
        admission = service.admit(len(generations), "generate", generations[0].adapter_id)
        if stream:
            outputs, on_close = await start_stream(
                request, service.stream(generations[0], current_request_id(), admission), 1,
                key=lambda _: 0, release=admission.release,
            )
    except ServiceError as exc:
        raise TgiError(exc) from None
    if stream:
        return sse_response(_stream_events(service, body, generations[0], outputs), on_close=on_close)
    try:
        return await cancel_on_disconnect(request, _generate(service, body, generations, admission))
    except ServiceError as exc:
        raise TgiError(exc) from None
    finally:
        admission.release()


@router.post("/generate", dependencies=[Depends(check_api_key)])
async def generate(request: Request, body: TgiRequest, service: GenerationService = Depends(get_service)):
    return await _run(request, body, service, stream=False)


@router.post("/generate_stream", dependencies=[Depends(check_api_key)])
async def generate_stream(request: Request, body: TgiRequest, service: GenerationService = Depends(get_service)):
    return await _run(request, body, service, stream=True)


@router.post("/", dependencies=[Depends(check_api_key)])
async def compat_generate(request: Request, body: TgiRequest, service: GenerationService = Depends(get_service)):
    """LoRAX's compat route: switches on `stream`; the non-streaming answer is a list of one."""
    if body.stream:
        return await _run(request, body, service, stream=True)
    return [await _run(request, body, service, stream=False)]


@router.get("/info")
async def info(request: Request, service: GenerationService = Depends(get_service)):
    config = service.config
    return {
        "model_id": service.served_model_name,
        "model_sha": None,
        "model_dtype": config.model.dtype,
        "model_device_type": config.model.device,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": config.server.max_concurrent_requests,
        "max_best_of": config.server.max_choices_per_request,
        "max_stop_sequences": config.server.max_stop_sequences,
        "max_stop_sequence_chars": config.server.max_stop_sequence_chars,
        "max_input_length": service.prompt_token_limit,
        "max_input_chars": service.prompt_char_limit,
        "max_choices_per_request": config.server.max_choices_per_request,
        "max_request_body_bytes": config.server.max_request_body_bytes,
        "max_total_tokens": service.max_model_len,
        "max_batch_total_tokens": config.scheduling.max_num_batched_tokens,
        "kv_cache_blocks": service.parts.core.scheduler.config.num_kv_blocks,
        "max_adapters": config.lora.max_loras,
        "max_lora_rank": config.lora.max_lora_rank,
        "adapter_source": "registry",
        "version": request.app.version,
        "sha": None,
        "docker_label": None,
    }


@router.get("/health")
async def health(service: GenerationService = Depends(get_service)):
    if not service.engine.is_alive:
        return JSONResponse({"error": "the engine is not running", "error_type": "unhealthy"}, status_code=503)
    if service.draining:
        return tgi_error_response(ShuttingDown("the server is shutting down"))
    return {}
