"""SSE decoding: events split across chunks, packed into one chunk, CRLF, comments; and the
stream parsers fed through httpx.MockTransport with hand-cut chunks."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from loramux.clients import AsyncClient, Client, ServerError
from loramux.clients.sse import SSEDecoder


def decode(chunks: list[str]) -> list[str]:
    decoder = SSEDecoder()
    events = [e for chunk in chunks for e in decoder.feed(chunk)]
    return events + decoder.flush()


def test_one_chunk_many_events():
    assert decode(['data: {"a":1}\n\ndata:{"b":2}\n\ndata: [DONE]\n\n']) == ['{"a":1}', '{"b":2}', "[DONE]"]


def test_event_split_at_every_position():
    text = 'data: {"token": "x"}\n\ndata: {"token": "y"}\n\n'
    for cut in range(len(text) + 1):
        assert decode([text[:cut], text[cut:]]) == ['{"token": "x"}', '{"token": "y"}'], cut


def test_one_character_at_a_time_with_crlf():
    text = "data: one\r\n\r\n: a comment\r\nevent: message\r\nid: 7\r\ndata: two\r\n\r\n"
    assert decode(list(text)) == ["one", "two"]


def test_bare_cr_line_endings_and_multiline_data():
    assert decode(["data: a\rdata: b\r\r"]) == ["a\nb"]


def test_last_event_without_blank_line_is_flushed():
    assert decode(["data: a\n\ndata: b"]) == ["a", "b"]


def test_only_space_after_colon_is_stripped():
    assert decode(["data:  two spaces\n\n", "data:none\n\n"]) == [" two spaces", "none"]


# --------------------------------------------------------------------------- parsers over a mock transport


def _tgi_events(texts: list[str]) -> list[str]:
    events = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        events.append("data:" + json.dumps({
            "token": {"id": i, "text": text, "logprob": -1.0, "special": False},
            "generated_text": "".join(texts) if last else None,
            "details": {"finish_reason": "eos_token", "prompt_tokens": 2, "generated_tokens": len(texts),
                        "seed": None} if last else None,
        }) + "\n\n")
    return events


def _transport(chunks: list[str], status: int = 200) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"content-type": "text/event-stream", "x-request-id": "r1"},
                              stream=httpx.ByteStream(b"") if not chunks else _Chunks(chunks))

    return httpx.MockTransport(handler)


class _Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body delivered in exactly these chunks (bytes, so a split may fall inside a UTF-8 character)."""

    def __init__(self, chunks: list[str]) -> None:
        data = "".join(chunks).encode()
        cuts = [0]
        for chunk in chunks:
            cuts.append(cuts[-1] + len(chunk.encode()))
        # shift every cut by one byte so that multi-byte characters get split too
        self.parts = [data[max(a - 1, 0):max(b - 1, 0)] for a, b in zip(cuts, cuts[1:])] + [data[max(cuts[-1] - 1, 0):]]

    def __iter__(self):
        yield from self.parts

    async def __aiter__(self):
        for part in self.parts:
            yield part


def test_tgi_stream_packed_and_split_chunks():
    events = _tgi_events(["Hé", "llo", " wörld"])
    chunks = [events[0] + events[1], events[2][:7], events[2][7:]]
    with Client("http://fake", transport=_transport(chunks)) as client:
        out = list(client.generate_stream("hi"))
    assert [e.text for e in out] == ["Hé", "llo", " wörld"]
    assert [e.is_final for e in out] == [False, False, True]
    result = out[-1].result
    assert result.text == "Héllo wörld" and result.finish_reason == "eos_token"
    assert result.generated_tokens == 3 and result.prompt_tokens == 2 and result.request_id == "r1"
    assert [t.id for t in result.tokens] == [0, 1, 2]


def test_async_tgi_stream_same_events():
    events = _tgi_events(["a", "b"])

    async def run():
        async with AsyncClient("http://fake", transport=_transport(["".join(events)])) as client:
            return [e async for e in client.generate_stream("hi")]

    out = asyncio.run(run())
    assert [e.text for e in out] == ["a", "b"] and out[-1].result.text == "ab"


def test_truncated_tgi_stream_raises():
    events = _tgi_events(["a", "b"])
    with Client("http://fake", transport=_transport(events[:1])) as client:
        stream = client.generate_stream("hi")
        assert next(stream).text == "a"
        with pytest.raises(ServerError, match="ended before"):
            next(stream)


def test_chat_stream_without_done_raises():
    chunk = 'data: {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": null}]}\n\n'
    with Client("http://fake", transport=_transport([chunk])) as client:
        with pytest.raises(ServerError, match=r"\[DONE\]"):
            list(client.chat("hi", stream=True))


def test_unreadable_event_is_a_server_error():
    with Client("http://fake", transport=_transport(["data: {not json\n\n"])) as client:
        with pytest.raises(ServerError, match="unreadable stream event"):
            list(client.generate_stream("hi"))
