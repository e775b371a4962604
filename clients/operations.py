"""Every API call as data: the request to send and how to read its answer (no I/O here).

`Client` and `AsyncClient` only move bytes; building bodies, mapping errors and parsing
results and stream events lives here once, so the two clients cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import quote

import httpx

from loramux.clients.errors import (
    APIConnectionError,
    InvalidAdapterPath,
    LoramuxError,
    ServerError,
    error_from_event,
    error_from_response,
)
from loramux.clients.sse import SSEDecoder
from loramux.clients.types import (
    AdapterInfo,
    ChatDelta,
    ChatResult,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    Token,
    Usage,
)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

REQUEST_ID_HEADER = "x-request-id"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz")  # what the server reads


def request_id_of(response: httpx.Response) -> str | None:
    return response.headers.get(REQUEST_ID_HEADER)


def connection_error(exc: httpx.TransportError, base_url: str) -> APIConnectionError:
    what = "timed out talking to" if isinstance(exc, httpx.TimeoutException) else "cannot reach"
    return APIConnectionError(f"{what} {base_url}: {exc or type(exc).__name__}")


def _raise(error: LoramuxError) -> Any:
    raise error


# --------------------------------------------------------------------------- plain calls


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request/answer exchange."""

    method: str
    path: str
    parse: Callable[[Any, str | None], T]  # (decoded JSON body, request id) -> result
    json: dict | None = None
    form: dict[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()  # opened only while the request is sent
    on_error: Callable[[LoramuxError], T] = _raise  # health() turns errors into False

    @contextmanager
    def content(self) -> Iterator[dict[str, Any]]:
        """httpx keyword arguments for the body; files stay open only inside this block."""
        if not self.files:
            yield {"json": self.json} if self.json is not None else {}
            return
        with ExitStack() as stack:
            files = [
                (_field_name(p), (p.name, stack.enter_context(p.open("rb")), _content_type(p))) for p in self.files
            ]
            yield {"data": self.form, "files": files}

    def result(self, response: httpx.Response) -> T:
        """The parsed answer of a response whose body has been read."""
        request_id = request_id_of(response)
        if response.is_error:
            return self.on_error(
                error_from_response(response.status_code, response.content, request_id, response.reason_phrase)
            )
        try:
            return self.parse(response.json() if response.content else None, request_id)
        except (ValueError, LookupError, TypeError, AttributeError) as exc:  # not JSON, or not this shape
            error = ServerError(f"unexpected answer from {self.path}: {exc!r}", response.status_code, None, request_id)
            return self.on_error(error)


def _field_name(path: Path) -> str:
    # One form field per file: a server reading the form as a dict keeps one value per key.
    return {CONFIG_NAME: "config", WEIGHTS_NAME: "weights"}.get(path.name, "file")


def _content_type(path: Path) -> str:
    return "application/json" if path.suffix == ".json" else "application/octet-stream"


# --------------------------------------------------------------------------- streams


class EventParser(Protocol[T_co]):
    def feed(self, data: str) -> list[T_co]: ...  # one SSE event's data -> results

    def close(self) -> list[T_co]: ...  # at the end of the body; raises if it ended early


class StreamReader(Generic[T]):
    """Text chunks of an SSE body -> parsed events, in order.

    Generators, so that the events before an error event still reach the caller.
    """

    def __init__(self, parser: EventParser[T]) -> None:
        self._sse = SSEDecoder()
        self._parser = parser

    def feed(self, chunk: str) -> Iterator[T]:
        for data in self._sse.feed(chunk):
            yield from self._parser.feed(data)

    def close(self) -> Iterator[T]:
        for data in self._sse.flush():
            yield from self._parser.feed(data)
        yield from self._parser.close()


@dataclass(frozen=True)
class StreamCall(Generic[T]):
    """A request answered by server-sent events."""

    method: str
    path: str
    json: dict
    parser: Callable[[str | None], EventParser[T]]  # request id -> a fresh parser

    def reader(self, response: httpx.Response) -> StreamReader[T]:
        """After the headers: raise the typed error of a refused stream (body read), else a reader."""
        if response.is_error:
            raise error_from_response(
                response.status_code, response.content, request_id_of(response), response.reason_phrase
            )
        return StreamReader(self.parser(request_id_of(response)))


def _json_event(data: str, request_id: str | None) -> dict:
    try:
        payload = json.loads(data)
    except ValueError:
        raise ServerError(f"unreadable stream event: {data[:200]!r}", None, None, request_id) from None
    error = error_from_event(payload, request_id) if isinstance(payload, dict) else None
    if error is not None:
        raise error
    return payload


class TgiStreamParser:
    """/generate_stream events: one token each; the last one has generated_text and details."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.tokens: list[Token] = []
        self.done = False

    def feed(self, data: str) -> list[StreamEvent]:
        payload = _json_event(data, self.request_id)
        token = Token.from_json(payload.get("token") or {})
        self.tokens.append(token)
        result = None
        if payload.get("generated_text") is not None:
            self.done = True
            result = replace(
                _generate_result(payload["generated_text"], payload.get("details"), self.request_id),
                tokens=tuple(self.tokens),  # the stream's details hold no token list: these are they
            )
        return [StreamEvent(token.text, token, result)]

    def close(self) -> list[StreamEvent]:
        if not self.done:
            raise ServerError("the stream ended before its final event", None, None, self.request_id)
        return []


class ChatStreamParser:
    """/v1/chat/completions chunks: content deltas of choice 0, then usage, then [DONE]."""

    def __init__(self, request_id: str | None) -> None:
        self.request_id = request_id
        self.done = False

    def feed(self, data: str) -> list[ChatDelta]:
        if data.strip() == "[DONE]":
            self.done = True
            return []
        payload = _json_event(data, self.request_id)
        out = []
        for choice in payload.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue  # n > 1 is not exposed by this client
            text = (choice.get("delta") or {}).get("content") or ""
            if text or choice.get("finish_reason"):
                out.append(ChatDelta(text, choice.get("finish_reason")))
        usage = Usage.from_json(payload.get("usage"))
        if usage is not None:
            out.append(ChatDelta("", None, usage))
        return out

    def close(self) -> list[ChatDelta]:
        if not self.done:
            raise ServerError("the stream ended before [DONE]", None, None, self.request_id)
        return []


# --------------------------------------------------------------------------- generation


def _params(params: dict[str, Any]) -> dict[str, Any]:
    """Unset (None) parameters are left out, so the server's defaults apply."""
    return {k: v for k, v in params.items() if v is not None}


def _generate_result(text: str, details: dict | None, request_id: str | None) -> GenerateResult:
    d = details or {}
    tokens = d.get("tokens")
    prefill = d.get("prefill")
    return GenerateResult(
        text=text,
        finish_reason=d.get("finish_reason"),
        generated_tokens=d.get("generated_tokens"),
        prompt_tokens=d.get("prompt_tokens"),
        tokens=tuple(Token.from_json(t) for t in tokens) if tokens else None,
        request_id=request_id,
        seed=d.get("seed"),
        prefill=tuple(Token.from_json(t) for t in prefill) if prefill else None,
    )


def _generate_body(prompt: str, adapter_id: str | None, params: dict[str, Any]) -> dict:
    # details=True by default: finish_reason and token counts cost the server nothing extra.
    parameters = {"details": True, **_params(params)}
    if adapter_id is not None:
        parameters["adapter_id"] = adapter_id
    return {"inputs": prompt, "parameters": parameters}


def generate(prompt: str, adapter_id: str | None, params: dict[str, Any]) -> Call[GenerateResult]:
    def parse(body: Any, request_id: str | None) -> GenerateResult:
        if isinstance(body, list):  # a TGI peer's `POST /` answers a list of one
            body = body[0]
        return _generate_result(body.get("generated_text", ""), body.get("details"), request_id)

    return Call("POST", "/generate", parse, json=_generate_body(prompt, adapter_id, params))


def generate_stream(prompt: str, adapter_id: str | None, params: dict[str, Any]) -> StreamCall[StreamEvent]:
    return StreamCall("POST", "/generate_stream", _generate_body(prompt, adapter_id, params), TgiStreamParser)


def _messages(messages: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)


def _chat_body(messages: str | list[dict], model: str | None, params: dict[str, Any], stream: bool) -> dict:
    body = {"model": model or "", "messages": _messages(messages), **_params(params), "stream": stream}
    if stream:
        body.setdefault("stream_options", {"include_usage": True})
    return body


def chat(messages: str | list[dict], model: str | None, params: dict[str, Any]) -> Call[ChatResult]:
    def parse(body: Any, request_id: str | None) -> ChatResult:
        choice = (body.get("choices") or [{}])[0]
        return ChatResult(
            text=(choice.get("message") or {}).get("content") or "",
            finish_reason=choice.get("finish_reason"),
            usage=Usage.from_json(body.get("usage")),
            model=body.get("model"),
            request_id=request_id,
        )

    return Call("POST", "/v1/chat/completions", parse, json=_chat_body(messages, model, params, stream=False))


def chat_stream(messages: str | list[dict], model: str | None, params: dict[str, Any]) -> StreamCall[ChatDelta]:
    return StreamCall("POST", "/v1/chat/completions", _chat_body(messages, model, params, True), ChatStreamParser)


def models() -> Call[tuple[ModelInfo, ...]]:
    return Call("GET", "/v1/models", lambda body, _: tuple(ModelInfo.from_json(m) for m in body.get("data", ())))


def health() -> Call[bool]:
    """True when the engine runs; False when the server says it does not, or cannot be reached."""

    def on_error(error: LoramuxError) -> bool:
        if isinstance(error, (ServerError, APIConnectionError)):
            return False
        raise error

    return Call("GET", "/health", lambda body, _: True, on_error=on_error)


# --------------------------------------------------------------------------- adapters


def _adapter_path(adapter_id: str, action: str = "") -> str:
    # Quoted: an id holding '/' or '..' must not turn into another route (e.g. /v1/health).
    return f"/v1/adapters/{quote(adapter_id, safe='')}{action}"


def _adapter(body: Any, _request_id: str | None) -> AdapterInfo:
    return AdapterInfo.from_json(body)


def list_adapters() -> Call[tuple[AdapterInfo, ...]]:
    return Call("GET", "/v1/adapters", lambda body, _: tuple(AdapterInfo.from_json(a) for a in body.get("data", ())))


def get_adapter(adapter_id: str) -> Call[AdapterInfo]:
    return Call("GET", _adapter_path(adapter_id), _adapter)


def delete_adapter(adapter_id: str) -> Call[None]:
    return Call("DELETE", _adapter_path(adapter_id), lambda body, _: None)


def pin_adapter(adapter_id: str) -> Call[AdapterInfo]:
    return Call("POST", _adapter_path(adapter_id, "/pin"), _adapter)


def unpin_adapter(adapter_id: str) -> Call[AdapterInfo]:
    return Call("POST", _adapter_path(adapter_id, "/unpin"), _adapter)


def adapter_files(path: str | Path) -> tuple[Path, ...]:
    """A directory holding the adapter's two files -> both; an archive file -> itself."""
    path = Path(path)
    if path.is_dir():
        files = (path / CONFIG_NAME, path / WEIGHTS_NAME)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InvalidAdapterPath(f"{path} lacks {', '.join(missing)}")
        return files
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise InvalidAdapterPath(
                f"{path} is not an adapter archive: pass a directory with {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}, or a {'/'.join(ARCHIVE_SUFFIXES)} file holding them"
            )
        return (path,)
    raise InvalidAdapterPath(f"{path} does not exist")


def upload_adapter(adapter_id: str, path: str | Path) -> Call[AdapterInfo]:
    return Call("POST", "/v1/adapters", _adapter, form={"adapter_id": adapter_id}, files=adapter_files(path))
