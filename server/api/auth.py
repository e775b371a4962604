"""API keys (`Authorization: Bearer <key>`), the admin key for adapter management, and the
guard of a keyless loopback server against browsers (cross-site posts, DNS rebinding).

Adapter management writes files and changes what every client is served, so it is refused
unless an admin key is configured. The one exception is a server bound to a loopback
address with no keys at all (local use): there any local process may manage adapters, but a
web page must not, so requests whose Origin names another site or whose Host is not a
loopback name are refused (a browser sends both; a rebinding attack shows its own Host).
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from fastapi import Request

from loramux.server.config import ServerConfig, is_loopback_host


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key")


def _matches(token: str | None, keys: tuple[str, ...]) -> bool:
    if token is None:
        return False
    given = token.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(given, key.encode("utf-8", "surrogateescape")) for key in keys)


def _host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1' (no port, no brackets)."""
    host = host_header.strip()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def browser_guard_error(headers) -> str | None:
    """Why a request to a keyless loopback server must be refused, or None.

    `headers`: a Starlette Headers. Origin "null" (sandboxed frames, file: pages) and any
    origin not on a loopback host name another site."""
    host = headers.get("host")
    if host is None or not is_loopback_host(_host_name(host)):
        return "this server only answers requests addressed to a loopback host name (Host header)"
    origin = headers.get("origin")
    if origin is not None:
        hostname = urlsplit(origin).hostname if origin != "null" else None
        if not hostname or not is_loopback_host(hostname):
            return "cross-site requests are refused (the Origin header names another site)"
    return None


def check_api_key(request: Request) -> None:
    config: ServerConfig = request.app.state.server_config
    if not config.api_keys and not config.admin_api_keys:
        return
    if not _matches(_bearer(request), config.api_keys + config.admin_api_keys):
        raise AuthError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)")


def check_metrics_key(request: Request) -> None:
    """/metrics is open unless the server was started with --metrics-require-api-key."""
    config: ServerConfig = request.app.state.server_config
    if config.metrics_require_api_key:
        check_api_key(request)


def check_admin_key(request: Request) -> None:
    config: ServerConfig = request.app.state.server_config
    if config.management_open_without_keys:
        return  # the browser guard (app middleware) has already vetted Host and Origin
    token = _bearer(request)
    if not config.admin_api_keys:
        if config.api_keys and not _matches(token, config.api_keys):
            raise AuthError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)")
        raise AuthError(
            403,
            "adapter management is disabled: start the server with an admin key "
            "(--admin-api-key or $LORAMUX_ADMIN_API_KEY), or bind it to 127.0.0.1 without keys for local use",
        )
    if _matches(token, config.admin_api_keys):
        return
    if _matches(token, config.api_keys):
        raise AuthError(403, "adapter management needs an admin API key")
    raise AuthError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)")
