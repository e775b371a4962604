"""Request-body limits enforced while the body streams in, and log-safe text.

Starlette's RequestBodyLimitResponder counts the bytes as the app receives them (and
refuses a declared Content-Length over the limit before reading anything); FastAPI
recognises its error while parsing and answers 413 before any model is built. Uploads get
their own, larger limit; every other route gets `default_limit`.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.middleware.body_limit import RequestBodyLimitResponder, _RequestBodyLimitResponseSent
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _Responder(RequestBodyLimitResponder):
    """Starlette's responder, answering in the API's error shape instead of plain text."""

    def __init__(self, app: ASGIApp, max_body_size: int, render: Callable[[Scope, int], Response]) -> None:
        super().__init__(app, max_body_size)
        self._render = render

    async def send_with_limit(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
            if self.content_length is not None and self.content_length > self.max_body_size:
                # The route answered without reading the body (or swallowed the error): 413.
                await self._render(self.scope, self.max_body_size)(self.scope, self.receive, self.send)
                raise _RequestBodyLimitResponseSent
        await self.send(message)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, default_limit: int, upload_limit: int, upload_paths: tuple[str, ...],
                 render: Callable[[Scope, int], Response]) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = frozenset(upload_paths)
        self.render = render  # (scope, limit) -> the 413 answer

    def limit_for(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path", "").rstrip("/") in self.upload_paths:
            return self.upload_limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await _Responder(self.app, self.limit_for(scope), self.render)(scope, receive, send)


def escape_for_log(text: str, max_chars: int = 512) -> str:
    """Client text in a log line: control characters, quotes and non-ASCII escaped (a path
    with a newline cannot forge a second log line), bounded in length."""
    escaped = text[:max_chars].encode("ascii", "backslashreplace").decode("ascii")
    escaped = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in escaped)
    return escaped + ("..." if len(text) > max_chars else "")
