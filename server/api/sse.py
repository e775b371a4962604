"""Server-sent events: `data:` lines, flushed one event at a time."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse_event(payload: dict | str, space: bool = True) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n" if space else f"data:{body}\n\n"


class _ClosingStreamingResponse(StreamingResponse):
    """Calls `on_close` however the response ends: finished, failed, or its client gone
    before the first event (when the event generator never starts, its own `finally`
    never runs)."""

    def __init__(self, content, on_close: Callable[[], None] | None = None, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:
                self._on_close()


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None,
                 on_close: Callable[[], None] | None = None) -> StreamingResponse:
    return _ClosingStreamingResponse(
        events,
        on_close=on_close,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
    )
