"""API keys: `Authorization: Bearer <key>`. Adapter management needs an admin key."""

from __future__ import annotations

import hmac

from fastapi import Request

from loramux.server.config import ServerConfig


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
    return token is not None and any(hmac.compare_digest(token, key) for key in keys)


def check_api_key(request: Request) -> None:
    config: ServerConfig = request.app.state.server_config
    if not config.api_keys and not config.admin_api_keys:
        return
    if not _matches(_bearer(request), config.api_keys + config.admin_api_keys):
        raise AuthError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)")


def check_admin_key(request: Request) -> None:
    config: ServerConfig = request.app.state.server_config
    if not config.api_keys and not config.admin_api_keys:
        return
    token = _bearer(request)
    if not config.admin_api_keys:
        raise AuthError(403, "adapter management is disabled: start the server with --admin-api-key")
    if _matches(token, config.admin_api_keys):
        return
    if _matches(token, config.api_keys):
        raise AuthError(403, "adapter management needs an admin API key")
    raise AuthError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)")
