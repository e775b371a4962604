"""A stand-in loramux server for client tests: the real routes' shapes, no model, no torch.

It answers /generate, /generate_stream, /v1/chat/completions, /v1/models, /health and the
/v1/adapters routes as server/api does (same JSON fields, both error shapes, SSE framing,
X-Request-Id, bearer keys with admin-only adapter routes). Generation is deterministic:
token i of a request reads f" {adapter or 'base'}{i}". Magic inputs make it fail:

- prompt (or chat model) "raise:NNN" -> an HTTP NNN error in that route family's shape;
- prompt (or chat model) "fail-mid-stream" -> one token, then an error event in the stream.

Streams deliberately pack two events into one write and split the others mid-event, so
the client's SSE decoder sees both cases. `ServerThread` runs it under uvicorn on a free
127.0.0.1 port in a daemon thread.
"""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

BASE_MODEL = "fake-base"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TGI_KINDS = {400: "validation", 422: "validation", 404: "not_found", 429: "overloaded", 424: "generation",
             500: "internal", 503: "unhealthy"}
OPENAI_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 413: "BadRequestError", 422: "BadRequestError", 429: "RateLimitError"}


@dataclass
class FakeState:
    admin_key: str | None = None  # when set, every route needs a key; adapters need this one
    user_key: str | None = None
    healthy: bool = True
    adapters: dict[str, dict] = field(default_factory=dict)
    uploads: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # id -> (config, weights)
    requests: list[dict] = field(default_factory=list)  # what came in: method, path, headers, body
    next_id: int = 0

    def reset(self) -> None:
        self.__init__()

    def add_adapter(self, adapter_id: str, rank: int = 8, **fields) -> dict:
        version = self.adapters.get(adapter_id, {}).get("version", 0) + 1
        info = {
            "id": adapter_id, "object": "adapter", "version": version, "status": "registered", "tier": "disk",
            "rank": rank, "target_modules": ["q_proj", "v_proj"], "bytes": 4096 * rank, "disk_bytes": 4096 * rank,
            "pinned": False, "running_requests": 0, "source": "upload", "error": None, "error_type": None,
            **fields,
        }
        self.adapters[adapter_id] = info
        return info


# --------------------------------------------------------------------------- error shapes


def tgi_error(status: int, message: str, kind: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind or TGI_KINDS.get(status, "internal")}, status)


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = OPENAI_TYPES.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status)


def _auth_error(path: str, status: int, message: str) -> JSONResponse:
    return openai_error(status, message) if path.startswith("/v1/") else tgi_error(status, message, "authentication")


def _raised(trigger: str | None) -> int | None:
    if trigger and trigger.startswith("raise:"):
        return int(trigger.removeprefix("raise:"))
    return None


def _sse(payload: dict | str, space: bool) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {body}\n\n" if space else f"data:{body}\n\n"


async def _chunked(events: list[str]):
    """Two events in one write, then the rest each split in two writes."""
    if len(events) >= 2:
        yield events[0] + events[1]
        events = events[2:]
    for event in events:
        half = len(event) // 2
        yield event[:half]
        yield event[half:]


# --------------------------------------------------------------------------- uploads


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """(form fields, [(filename, bytes)]) — stdlib parsing, so the fake needs no python-multipart."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields, files, names = {}, [], set()
    for part in message.iter_parts():
        data = part.get_payload(decode=True) or b""
        name = part.get_param("name", header="content-disposition")
        # The real server once read the form as a dict (one value per key): keep clients compatible.
        if name in names:
            raise ValueError(f"form field {name!r} sent twice")
        names.add(name)
        if part.get_filename():
            files.append((part.get_filename(), data))
        else:
            fields[name] = data.decode()
    return fields, files


def _from_archive(name: str, data: bytes) -> dict[str, bytes]:
    found = {}
    if name.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                found[info.filename.rsplit("/", 1)[-1]] = archive.read(info)
    else:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as archive:
            for member in archive:
                if member.isfile():
                    found[member.name.rsplit("/", 1)[-1]] = archive.extractfile(member).read()
    return found


# --------------------------------------------------------------------------- the app


def create_fake_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def context(request: Request, call_next):
        body = await request.body()
        state.requests.append({"method": request.method, "path": request.url.path,
                               "raw_path": request.scope.get("raw_path"),
                               "headers": dict(request.headers), "body": body})
        request_id = request.headers.get("x-request-id")
        if request_id is None:
            state.next_id += 1
            request_id = f"req-{state.next_id}"
        response = _check_key(state, request) or await call_next(request)
        response.headers["X-Request-Id"] = request_id
        return response

    # -- generation (TGI)

    def tokens(adapter: str | None, n: int) -> list[dict]:
        return [{"id": 100 + i, "text": f" {adapter or 'base'}{i}", "logprob": -0.5, "special": False,
                 "skipped": False} for i in range(n)]

    def check_generate(body: dict) -> JSONResponse | None:
        status = _raised(body.get("inputs"))
        if status:
            return tgi_error(status, f"forced error {status}")
        adapter = body.get("parameters", {}).get("adapter_id")
        if adapter is not None and adapter not in state.adapters:
            return tgi_error(404, f"adapter {adapter!r} is not registered")
        return None

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        if (error := check_generate(body)) is not None:
            return error
        p = body.get("parameters", {})
        toks = tokens(p.get("adapter_id"), p.get("max_new_tokens") or 3)
        response = {"generated_text": "".join(t["text"] for t in toks)}
        if p.get("details"):
            response["details"] = {"finish_reason": "length", "prompt_tokens": len(body["inputs"].split()),
                                   "generated_tokens": len(toks), "skipped_tokens": 0, "seed": p.get("seed"),
                                   "prefill": [], "tokens": toks}
        return response

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        body = await request.json()
        if (error := check_generate(body)) is not None:
            return error
        p = body.get("parameters", {})
        toks = tokens(p.get("adapter_id"), p.get("max_new_tokens") or 3)
        events = []
        for i, token in enumerate(toks):
            last = i == len(toks) - 1
            event = {"token": token, "generated_text": None, "details": None}
            if last:
                event["generated_text"] = "".join(t["text"] for t in toks)
                event["details"] = {"finish_reason": "length", "prompt_tokens": len(body["inputs"].split()),
                                    "generated_tokens": len(toks), "seed": None}
            events.append(_sse(event, space=False))
            if body["inputs"] == "fail-mid-stream":
                events.append(_sse({"error": "the generation failed", "error_type": "generation"}, space=False))
                break
        return StreamingResponse(_chunked(events), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        if not state.healthy:
            return tgi_error(503, "the engine is not running", "unhealthy")
        return {}

    # -- OpenAI

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        model = body.get("model", "")
        if status := _raised(model):
            return openai_error(status, f"forced error {status}", "model")
        adapter = model if model not in ("", BASE_MODEL, "fail-mid-stream") else None
        if adapter is not None and adapter not in state.adapters:
            return openai_error(404, f"The model `{model}` does not exist.", "model")
        pieces = [t["text"] for t in tokens(adapter, body.get("max_tokens") or 3)]
        usage = {"prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}
        head = {"id": "chatcmpl-1", "created": 0, "model": model or BASE_MODEL}
        if not body.get("stream"):
            return {**head, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(pieces)}, "logprobs": None,
                "finish_reason": "length", "stop_reason": None}]}
        include_usage = (body.get("stream_options") or {}).get("include_usage", False)

        def chunk(choices: list[dict], last_usage: dict | None = None) -> str:
            payload = {**head, "object": "chat.completion.chunk", "choices": choices}
            if include_usage:
                payload["usage"] = last_usage
            return _sse(payload, space=True)

        events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            events.append(chunk([{"index": 0, "delta": {"content": piece}, "logprobs": None,
                                  "finish_reason": "length" if last else None}]))
            if model == "fail-mid-stream":
                events.append(_sse({"error": {"message": "the generation failed", "type": "InternalServerError",
                                              "param": None, "code": 500}}, space=True))
                break
        else:
            if include_usage:
                events.append(chunk([], usage))
        events.append(_sse("[DONE]", space=True))
        return StreamingResponse(_chunked(events), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        data = [{"id": BASE_MODEL, "object": "model", "owned_by": "loramux", "root": BASE_MODEL, "parent": None,
                 "max_model_len": 2048}]
        data += [{"id": a, "object": "model", "owned_by": "loramux", "root": a, "parent": BASE_MODEL,
                  "max_model_len": 2048} for a in state.adapters]
        return {"object": "list", "data": data}

    # -- adapters

    def unknown(adapter_id: str) -> JSONResponse:
        return openai_error(404, f"adapter {adapter_id!r} is not registered", "adapter_id")

    @app.post("/v1/adapters", status_code=201)
    async def upload(request: Request):
        try:
            fields, files = _multipart(request.headers.get("content-type", ""), await request.body())
        except ValueError as exc:
            return openai_error(400, str(exc), "file")
        adapter_id = fields.get("adapter_id")
        if not adapter_id:
            return openai_error(400, "the form needs an `adapter_id` field", "adapter_id")
        if len(files) == 1 and files[0][0].endswith((".zip", ".tar", ".tar.gz", ".tgz")):
            found = _from_archive(*files[0])
        else:
            found = dict(files)
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in found]
        if missing:
            return openai_error(400, f"the upload lacks {', '.join(missing)}", "file")
        config = json.loads(found[CONFIG_NAME])
        state.uploads[adapter_id] = (found[CONFIG_NAME], found[WEIGHTS_NAME])
        return state.add_adapter(adapter_id, rank=config.get("r", 8), bytes=len(found[WEIGHTS_NAME]))

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": list(state.adapters.values())}

    @app.get("/v1/adapters/{adapter_id}")
    async def get_adapter(adapter_id: str):
        return state.adapters.get(adapter_id) or unknown(adapter_id)

    @app.delete("/v1/adapters/{adapter_id}")
    async def delete_adapter(adapter_id: str):
        if state.adapters.pop(adapter_id, None) is None:
            return unknown(adapter_id)
        return {"id": adapter_id, "object": "adapter", "deleted": True}

    @app.post("/v1/adapters/{adapter_id}/{action}")
    async def pin(adapter_id: str, action: str):
        info = state.adapters.get(adapter_id)
        if info is None or action not in ("pin", "unpin"):
            return unknown(adapter_id)
        info.update(pinned=action == "pin", tier="device" if action == "pin" else info["tier"])
        return info

    return app


def _check_key(state: FakeState, request: Request) -> JSONResponse | None:
    """server/api/auth.py's rules: any key for generation, the admin key for /v1/adapters."""
    if state.admin_key is None or request.url.path == "/health":
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else None
    path = request.url.path
    if path.startswith("/v1/adapters"):
        if token == state.admin_key:
            return None
        if token is not None and token == state.user_key:
            return _auth_error(path, 403, "adapter management needs an admin API key")
    elif token in (state.admin_key, state.user_key) and token is not None:
        return None
    return _auth_error(path, 401, "missing or invalid API key (send `Authorization: Bearer <key>`)")


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port from a daemon thread."""

    def __init__(self, app: FastAPI) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._socket.close()
