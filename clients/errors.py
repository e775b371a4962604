"""Typed client errors, built from either of the server's two error shapes.

TGI routes answer `{"error": msg, "error_type": kind}`; OpenAI and adapter routes answer
`{"error": {"message", "type", "param", "code"}}`. Streams carry the same bodies as an SSE
event after a 200, so the status there comes from the body, not from HTTP.
"""

from __future__ import annotations

import json


class LoramuxError(Exception):
    """Any error the server answered with (or, with status_code None, a client-side one)."""

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.error_type = error_type
        self.request_id = request_id
        self.param = param

    def __str__(self) -> str:
        where = [f"HTTP {self.status_code}"] if self.status_code is not None else []
        if self.request_id:
            where.append(f"request {self.request_id}")
        return f"{self.message} ({', '.join(where)})" if where else self.message


class AuthenticationError(LoramuxError):
    """401 (missing or wrong key) or 403 (the key may not do this, e.g. manage adapters)."""


class NotFoundError(LoramuxError):
    """404: unknown adapter, model or route."""


class ValidationError(LoramuxError):
    """400 / 413 / 422: the request, its parameters or the uploaded adapter were refused."""


class RateLimitError(LoramuxError):
    """429: the server is at capacity; retry later."""


class ServerError(LoramuxError):
    """5xx, TGI's 424 (generation failed), or a stream that broke off."""


class APIConnectionError(LoramuxError):
    """The server could not be reached, or did not answer in time (no HTTP status)."""


class InvalidAdapterPath(LoramuxError, ValueError):
    """upload_adapter got a path that is neither an adapter directory nor an archive."""


# TGI's error_type -> status, for errors that arrive inside a 200 stream.
_TGI_KIND_STATUS = {
    "validation": 422,
    "not_found": 404,
    "overloaded": 429,
    "generation": 424,
    "internal": 500,
    "authentication": 401,
    "unhealthy": 503,
}


def error_class(status: int | None) -> type[LoramuxError]:
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return NotFoundError
    if status in (400, 413, 422):
        return ValidationError
    if status == 429:
        return RateLimitError
    if status is not None and (status >= 500 or status == 424):  # 424: TGI's generation failure
        return ServerError
    return LoramuxError


def parse_error_body(body: object) -> tuple[str, str | None, str | None, int | None] | None:
    """-> (message, error_type, param, status named in the body) if `body` is an error shape."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):  # OpenAI shape
        code = error.get("code")
        status = code if isinstance(code, int) else None
        return str(error.get("message", "")), error.get("type"), error.get("param"), status
    if isinstance(error, str):  # TGI shape
        kind = body.get("error_type")
        return error, kind, None, _TGI_KIND_STATUS.get(kind)
    if "detail" in body:  # FastAPI's own answers (unknown route, wrong method)
        detail = body["detail"]
        return (detail if isinstance(detail, str) else json.dumps(detail)), None, None, None
    return None


def error_from_response(status: int, content: bytes, request_id: str | None, reason: str = "") -> LoramuxError:
    """An HTTP error answer -> the typed error for its status."""
    try:
        parsed = parse_error_body(json.loads(content))
    except ValueError:
        parsed = None
    if parsed is None:
        text = content.decode("utf-8", "replace").strip()[:500]
        parsed = (text or reason or "error", None, None, None)
    message, error_type, param, _ = parsed
    return error_class(status)(message, status, error_type, request_id, param)


def error_from_event(payload: dict, request_id: str | None) -> LoramuxError | None:
    """An error event inside a stream -> a typed error (status from the body), else None."""
    parsed = parse_error_body(payload)
    if parsed is None or "detail" in payload:
        return None
    message, error_type, param, status = parsed
    cls = error_class(status) if status is not None else ServerError  # a stream that failed mid-way
    return cls(message, status, error_type, request_id, param)
