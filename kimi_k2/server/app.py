"""The ASGI app: both APIs, /health, /metrics, API keys, and errors in each API's own envelope.

Paths under /v1/messages speak Anthropic's error format, everything else OpenAI's. Any exception that escapes a
route is reported as that API's 500 error; routes validate input first, so request content cannot reach it.
"""

from __future__ import annotations

import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from kimi_k2.server import anthropic_api, openai_api
from kimi_k2.server.errors import APIError, anthropic_error, openai_error, pydantic_message
from kimi_k2.server.state import ServerState

log = logging.getLogger("kimi_k2.server")
OPEN_PATHS = ("/health", "/metrics", "/docs", "/openapi.json", "/redoc")


def error_json(request: Request, e: APIError) -> JSONResponse:
    anthropic = request.url.path.startswith("/v1/messages")
    body = anthropic_error(e) if anthropic else openai_error(e)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(body, status_code=e.status, headers=headers)


def build_app(state: ServerState, manage_engine: bool = True) -> FastAPI:
    """`manage_engine`: start the engine with the app and drain it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine:
            state.engine.start()
        yield
        if manage_engine:
            state.engine.shutdown(drain=True)

    app = FastAPI(title="kimi-k2", summary="OpenAI- and Anthropic-compatible Kimi K2 server", lifespan=lifespan)
    app.state.k2 = state
    app.include_router(openai_api.router)
    app.include_router(anthropic_api.router)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if state.api_key and not path.startswith(OPEN_PATHS):
            given = request.headers.get("x-api-key") or ""
            bearer = request.headers.get("authorization") or ""
            if bearer.lower().startswith("bearer "):
                given = given or bearer[7:].strip()
            if not hmac.compare_digest(given.encode(), state.api_key.encode()):
                state.metrics.requests[(path, 401)] += 1
                return error_json(request, APIError(401, "invalid or missing API key (send 'Authorization: Bearer "
                                                         "KEY' or 'x-api-key: KEY')", code="invalid_api_key"))
        response = await call_next(request)
        if path.startswith("/v1/"):
            state.metrics.requests[(path, response.status_code)] += 1
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_json(request, e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        msg, param = pydantic_message(list(e.errors()))
        return error_json(request, APIError(400, msg, param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_json(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_json(request, APIError(500, f"internal error: {type(e).__name__}"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": state.model_names}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return state.metrics.render(state.engine.stats())

    return app
