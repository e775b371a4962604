"""Server-sent events: `data:` lines, flushed one event at a time."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loramux.server.api.context import cancel_on_disconnect

T = TypeVar("T")


def sse_event(payload: dict | str, space: bool = True) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n" if space else f"data:{body}\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Calls `on_close` however the response ends: finished, failed, or its client gone
    before the first event (when the event generator never starts, its own `finally`
    never runs)."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None] | None] | None = None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:
                closing = self._on_close()
                if inspect.isawaitable(closing):
                    await closing


async def primed(outputs: AsyncIterator[T], streams: int, key: Callable[[T], Hashable]) -> AsyncIterator[T]:
    """Await the first output of each of the `streams` streams merged in `outputs` (told
    apart by `key`), so that whatever fails before any output (an adapter deleted while
    the request queued, the engine refusing it) raises here, before a stream's 200, as a
    plain error status. Returns an iterator over those first outputs and the rest; the
    caller closes `outputs` if the response never iterates it."""
    first: list[T] = []
    started: set[Hashable] = set()
    while len(started) < streams:
        try:
            item = await anext(outputs)
        except StopAsyncIteration:
            break
        first.append(item)
        started.add(key(item))
    return _chained(first, outputs)


async def _chained(first: list[T], rest: AsyncIterator[T]) -> AsyncIterator[T]:
    for item in first:
        yield item
    async for item in rest:
        yield item


async def close_quietly(outputs: AsyncIterator) -> None:
    """Close a started async generator the response may never have iterated (its client
    went away before the first event): its `finally` aborts the engine requests."""
    try:
        await outputs.aclose()  # type: ignore[attr-defined]
    except RuntimeError:  # still running in a task being cancelled: that task closes it
        pass


async def start_stream(request: Request, outputs: AsyncIterator[T], streams: int, key: Callable[[T], Hashable],
                       release: Callable[[], None]) -> tuple[AsyncIterator[T], Callable[[], Awaitable[None]]]:
    """A streaming request's outputs once each of its streams has its first one (`primed`;
    given up if the client goes away meanwhile), and the response's `on_close`: it aborts
    what the response never read and gives the request's slots back (`release`). If the
    request fails first, its slots are given back and the error raised."""
    try:
        started = await cancel_on_disconnect(request, primed(outputs, streams, key))
    except BaseException:
        await close_quietly(outputs)
        release()
        raise

    async def on_close() -> None:
        await close_quietly(outputs)
        release()

    return started, on_close


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None,
                 on_close: Callable[[], Awaitable[None] | None] | None = None) -> StreamingResponse:
    return _ClosingStreamingResponse(
        events,
        on_close=on_close,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )
