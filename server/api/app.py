"""The FastAPI application: routes, middleware (request ids, logging), error shapes, lifespan."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from loramux.server.api import adapters, openai, tgi
from loramux.server.api.auth import AuthError
from loramux.server.api.context import (
    REQUEST_ID_HEADER,
    ClientDisconnected,
    new_request_id,
    reset_request_id,
    set_request_id,
)
from loramux.server.api.openai import OpenAIError, openai_error_response
from loramux.server.api.tgi import TgiError, tgi_error_response
from loramux.server.builder import EngineParts
from loramux.server.engine import AsyncEngine
from loramux.server.metrics import ServerMetrics
from loramux.server.service import GenerationService, InvalidRequest

logger = logging.getLogger("loramux.http")
VERSION = "0.1.0"


def _is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def create_app(parts: EngineParts, metrics: ServerMetrics) -> FastAPI:
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
    kv_cache = parts.core.scheduler.kv_cache
    metrics.watch_prefix_cache(kv_cache.stats.snapshot, lambda: kv_cache.num_cached_blocks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        logger.info("serving %s", parts.config.model.served_model_name)
        try:
            yield
        finally:
            engine.shutdown()
            parts.close()

    app = FastAPI(title="loramux", version=VERSION, lifespan=lifespan)
    app.state.service = GenerationService(parts, engine, metrics)
    app.state.server_config = parts.config.server
    app.state.metrics = metrics

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        request_id = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        request_id = request_id[:128]
        token = set_request_id(request_id)
        started = time.perf_counter()
        try:
            response = await call_next(request)
            response.headers[REQUEST_ID_HEADER] = request_id
            logger.info(
                "%s %s -> %d (%.0f ms)", request.method, request.url.path, response.status_code,
                (time.perf_counter() - started) * 1e3,
            )
            return response
        finally:
            reset_request_id(token)

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
        error = InvalidRequest(f"invalid request: {details}")
        if _is_openai_path(request.url.path):
            return openai_error_response(error)
        return tgi_error_response(error)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(tgi.router)
    return app
