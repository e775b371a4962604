"""Every error class, from both error shapes, before and inside streams (httpx.MockTransport)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loramux.clients import (
    APIConnectionError,
    AsyncClient,
    AuthenticationError,
    Client,
    LoramuxError,
    NotFoundError,
    RateLimitError,
    ServerError,
    ValidationError,
)
from loramux.clients.errors import error_from_response

CASES = [
    (400, ValidationError),
    (401, AuthenticationError),
    (403, AuthenticationError),
    (404, NotFoundError),
    (409, LoramuxError),
    (413, ValidationError),
    (422, ValidationError),
    (424, ServerError),
    (429, RateLimitError),
    (500, ServerError),
    (503, ServerError),
]


def tgi_body(status: int) -> dict:
    return {"error": f"tgi says {status}", "error_type": "some_kind"}


def openai_body(status: int) -> dict:
    return {"error": {"message": f"openai says {status}", "type": "SomeError", "param": "model", "code": status}}


def answering(status: int, body: dict | bytes, content_type: str = "application/json") -> httpx.MockTransport:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.MockTransport(
        lambda request: httpx.Response(status, content=content,
                                       headers={"content-type": content_type, "x-request-id": "rid-7"})
    )


@pytest.mark.parametrize("status, cls", CASES)
@pytest.mark.parametrize("shape", ["tgi", "openai"])
def test_status_maps_to_class_in_both_shapes(status, cls, shape):
    body = tgi_body(status) if shape == "tgi" else openai_body(status)
    with Client("http://fake", transport=answering(status, body)) as client:
        with pytest.raises(cls) as caught:
            client.generate("hi")
    error = caught.value
    assert type(error) is cls  # not a broader or narrower class
    assert error.status_code == status and error.request_id == "rid-7"
    assert error.message == f"{shape} says {status}"
    assert error.error_type == ("some_kind" if shape == "tgi" else "SomeError")
    assert error.param == (None if shape == "tgi" else "model")
    assert f"HTTP {status}" in str(error) and "rid-7" in str(error)


@pytest.mark.parametrize("shape", ["tgi", "openai"])
def test_refused_stream_raises_typed_error(shape):
    body = tgi_body(422) if shape == "tgi" else openai_body(422)
    with Client("http://fake", transport=answering(422, body)) as client:
        with pytest.raises(ValidationError, match=f"{shape} says 422"):
            list(client.generate_stream("hi"))
        with pytest.raises(ValidationError):
            list(client.chat("hi", stream=True))


def test_async_errors_are_the_same_classes():
    async def run(status, body):
        async with AsyncClient("http://fake", transport=answering(status, body)) as client:
            await client.list_adapters()

    for status, cls in CASES:
        with pytest.raises(cls):
            asyncio.run(run(status, openai_body(status)))


def _stream_of(*events: str) -> httpx.MockTransport:
    content = "".join(f"data:{e}\n\n" for e in events).encode()
    return answering(200, content, "text/event-stream")


@pytest.mark.parametrize("kind, cls, status", [
    ("validation", ValidationError, 422), ("not_found", NotFoundError, 404), ("overloaded", RateLimitError, 429),
    ("generation", ServerError, 424), ("internal", ServerError, 500), ("something_new", ServerError, None),
])
def test_tgi_error_event_inside_a_stream(kind, cls, status):
    token = json.dumps({"token": {"id": 1, "text": "a", "logprob": 0.0, "special": False},
                        "generated_text": None, "details": None})
    error = json.dumps({"error": "broke", "error_type": kind})
    with Client("http://fake", transport=_stream_of(token, error)) as client:
        seen = []
        with pytest.raises(cls) as caught:
            for event in client.generate_stream("hi"):
                seen.append(event.text)
    assert seen == ["a"]  # the token before the error still arrived
    assert type(caught.value) is cls and caught.value.status_code == status and caught.value.message == "broke"


def test_openai_error_event_inside_a_chat_stream():
    chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": None}]})
    with Client("http://fake", transport=_stream_of(chunk, json.dumps(openai_body(429)), "[DONE]")) as client:
        with pytest.raises(RateLimitError, match="openai says 429") as caught:
            list(client.chat("hi", stream=True))
    assert caught.value.request_id == "rid-7"


def test_non_json_and_fastapi_bodies():
    with Client("http://fake", transport=answering(502, b"<html>Bad Gateway</html>", "text/html")) as client:
        with pytest.raises(ServerError, match="Bad Gateway"):
            client.models()
    with Client("http://fake", transport=answering(404, {"detail": "Not Found"})) as client:
        with pytest.raises(NotFoundError, match="Not Found"):
            client.get_adapter("x")
    empty = error_from_response(500, b"", None, "Internal Server Error")
    assert type(empty) is ServerError and empty.message == "Internal Server Error"


def test_unexpected_success_body_is_a_server_error():
    with Client("http://fake", transport=answering(200, b"not json", "text/plain")) as client:
        with pytest.raises(ServerError, match="unexpected answer"):
            client.generate("hi")


def test_connection_refused_and_timeout():
    def refuse(request):
        raise httpx.ConnectError("connection refused", request=request)

    def slow(request):
        raise httpx.ReadTimeout("timed out", request=request)

    with Client("http://nowhere:1", transport=httpx.MockTransport(refuse)) as client:
        with pytest.raises(APIConnectionError, match="cannot reach http://nowhere:1") as caught:
            client.generate("hi")
        assert caught.value.status_code is None
        with pytest.raises(APIConnectionError):
            list(client.generate_stream("hi"))
        assert client.health() is False  # health() answers, it does not raise
    with Client("http://slow", transport=httpx.MockTransport(slow)) as client:
        with pytest.raises(APIConnectionError, match="timed out"):
            client.list_adapters()
