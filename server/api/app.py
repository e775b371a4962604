"""The FastAPI application: routes, middleware (body limits, request ids, logging, the
browser guard, draining), the one place errors become HTTP answers, lifespan.

Errors: routes raise ServiceError (or the store's typed errors, mapped in adapters.py);
the handlers here render them by route, OpenAI's shape under /v1/ and LoRAX's elsewhere,
with server paths removed (api/redact.py). Anything unexpected is a 500 that says nothing
about the server beyond the request id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux.server.api import adapters, openai, tgi
from loramux.server.api.auth import AuthError, browser_guard_error, check_metrics_key
from loramux.server.api.limits import BodyLimitMiddleware, escape_for_log
from loramux.server.api.context import (
    REQUEST_ID_HEADER,
    ClientDisconnected,
    current_request_id,
    new_request_id,
    reset_request_id,
    set_request_id,
)
from loramux.server.api.openai import OpenAIError, openai_error_response
from loramux.server.api.tgi import TgiError, tgi_error_response
from loramux.server.builder import EngineParts
from loramux.server.engine import AsyncEngine
from loramux.server.metrics import ServerMetrics
from loramux.server.service import GenerationService, InvalidRequest, ServiceError, ShuttingDown

logger = logging.getLogger("loramux.http")
VERSION = "0.1.0"
# Kept answering while draining: the orchestrator's probe and the scrape.
_OPEN_WHILE_DRAINING = ("/health", "/metrics")
FATAL_EXIT_CODE = 70  # EX_SOFTWARE: the engine died


class _ErrorText(ServiceError):
    """An error raised outside the service (HTTP layer), rendered like the others."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.kind = kind


def _is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_response(request: Request, error: ServiceError, status: int | None = None) -> JSONResponse:
    """The one renderer: OpenAI's error shape under /v1/, LoRAX's elsewhere."""
    if _is_openai_path(request.url.path):
        return openai_error_response(error, status)
    return tgi_error_response(error, status)


def _exit_soon(code: int, delay_s: float = 1.0) -> None:
    """The default reaction to a dead engine when no server runner is attached: exit after
    the failed requests had a moment to get their answers."""
    asyncio.get_running_loop().call_later(delay_s, os._exit, code)


def create_app(parts: EngineParts, metrics: ServerMetrics,
               on_fatal: Callable[[int], None] | None = None) -> FastAPI:
    """`on_fatal(code)`: called on the event loop when the engine thread has died (after its
    requests were failed); the process must exit with `code` so that it is restarted."""
    engine = AsyncEngine(parts.core, parts.config.model.num_threads)
    def observe(core, _outputs, stepped: bool) -> None:
        scheduler = core.scheduler
        metrics.observe_step(
            core.last_step.num_scheduled_requests if stepped else 0,
            core.last_step.num_scheduled_tokens if stepped else 0,
            scheduler.num_running,
            scheduler.num_waiting,
            scheduler.kv_cache_usage,
            scheduler.running_adapter_ids,
            scheduler.waiting_adapter_ids,
        )

    engine.step_listeners.append(observe)
    metrics.watch_store(parts.store.stats)
    metrics.watch_cpu_arena(parts.store.arena_stats)
    kv_cache = parts.core.scheduler.kv_cache
    metrics.watch_prefix_cache(kv_cache.stats.snapshot, lambda: kv_cache.num_cached_blocks)

    def on_engine_death(exc: BaseException) -> None:
        logger.critical("the engine thread died (%s): exiting with code %d", type(exc).__name__, FATAL_EXIT_CODE)
        (on_fatal or _exit_soon)(FATAL_EXIT_CODE)

    engine.on_death = on_engine_death

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        logger.info("serving %s", parts.config.model.served_model_name)
        try:
            yield
        finally:
            engine.shutdown()
            service.close()
            parts.close()

    server_config = parts.config.server
    app = FastAPI(title="loramux", version=VERSION, lifespan=lifespan)
    service = GenerationService(parts, engine, metrics)
    app.state.service = service
    app.state.server_config = server_config
    app.state.metrics = metrics

    def too_large(scope, limit: int | None) -> ServiceError:
        if scope.get("path", "").rstrip("/") == "/v1/adapters":  # name the limit the operator set
            max_upload = parts.store.config.max_upload_bytes
            return _ErrorText("too_large", f"the upload exceeds the limit of {max_upload} bytes", "file")
        limit_text = f" (the limit is {limit} bytes)" if limit else ""
        return _ErrorText("too_large", f"the request body is too large{limit_text}", "body")

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        request_id = escape_for_log(request.headers.get(REQUEST_ID_HEADER) or new_request_id(), 128)
        token = set_request_id(request_id)
        started = time.perf_counter()
        try:
            response = None
            if server_config.management_open_without_keys:
                refused = browser_guard_error(request.headers)
                if refused:
                    response = error_response(request, _ErrorText("forbidden", refused), 403)
            if response is None and service.draining and request.url.path not in _OPEN_WHILE_DRAINING:
                response = error_response(request, ShuttingDown("the server is shutting down; retry later"))
            if response is None:
                response = await call_next(request)
            response.headers[REQUEST_ID_HEADER] = request_id
            logger.info(
                # scope["path"]: the path as sent (percent-decoded); request.url would drop
                # control characters silently, this shows them escaped.
                "%s %s -> %d (%.0f ms)", escape_for_log(request.method, 16), escape_for_log(request.scope["path"]),
                response.status_code, (time.perf_counter() - started) * 1e3,
            )
            return response
        finally:
            reset_request_id(token)

    # Outermost of our middleware: bodies are counted as they stream in, before any parsing.
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=server_config.max_request_body_bytes,
        upload_limit=parts.store.config.max_upload_bytes + adapters_upload_overhead(),
        upload_paths=("/v1/adapters",),
        render=lambda scope, limit: error_response(Request(scope), too_large(scope, limit), 413),
    )

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError):
        return error_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        kinds = {404: "not_found", 413: "too_large", 429: "overloaded", 503: "unavailable"}
        detail = exc.detail if isinstance(exc.detail, str) else "the request was refused"
        if exc.status_code == 413:
            return error_response(request, too_large(request.scope, request.scope.get("starlette.max_body_size")), 413)
        response = error_response(request, _ErrorText(kinds.get(exc.status_code, "validation"), detail),
                                  exc.status_code)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception):
        logger.error("unhandled %s on %s", type(exc).__name__, escape_for_log(request.url.path), exc_info=exc)
        error = _ErrorText("internal", f"internal error (request id {current_request_id()})")
        return error_response(request, error, 500)

    @app.exception_handler(TgiError)
    async def on_tgi_error(request: Request, exc: TgiError):
        return tgi_error_response(exc.error)

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError):
        return openai_error_response(exc.error)

    @app.exception_handler(AuthError)
    async def on_auth_error(request: Request, exc: AuthError):
        if _is_openai_path(request.url.path):
            kind = "AuthenticationError" if exc.status == 401 else "PermissionDeniedError"
            body = {"error": {"message": exc.message, "type": kind, "param": None, "code": exc.status}}
        else:
            body = {"error": exc.message, "error_type": "authentication"}
        return JSONResponse(body, status_code=exc.status, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ClientDisconnected)
    async def on_client_disconnected(request: Request, exc: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request": logged, never read

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        details = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}" for e in exc.errors()
        )
        first = next(iter(exc.errors()), {})
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_response(request, InvalidRequest(f"invalid request: {details}", param))

    @app.get("/metrics", dependencies=[Depends(check_metrics_key)])
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(tgi.router)
    return app


def adapters_upload_overhead() -> int:
    """Room for the multipart framing and form fields around an upload's files."""
    return 1 << 20
