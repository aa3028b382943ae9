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
API_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/messages", "/v1/messages/count_tokens"}


def error_json(request: Request, e: APIError) -> JSONResponse:
    anthropic = request.url.path.startswith("/v1/messages")
    body = anthropic_error(e) if anthropic else openai_error(e)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(body, status_code=e.status, headers=headers)


class AuthAndCount:
    """Pure ASGI middleware (so routes still see client disconnects): API key check, request counts by status."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, metrics = scope["path"], self.state.metrics
        label = path if path in API_PATHS else "other"  # bounded label set, no client text in /metrics
        if self.state.api_key and not path.startswith(OPEN_PATHS):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            given = headers.get("x-api-key") or ""
            bearer = headers.get("authorization") or ""
            if bearer.lower().startswith("bearer "):
                given = given or bearer[7:].strip()
            if not hmac.compare_digest(given.encode(), self.state.api_key.encode()):
                metrics.requests[(label, 401)] += 1
                e = APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')",
                             code="invalid_api_key")
                return await error_json(Request(scope), e)(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and not path.startswith(OPEN_PATHS):
                metrics.requests[(label, message["status"])] += 1
            await send(message)

        await self.app(scope, receive, counting_send)


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

    app.add_middleware(AuthAndCount, state=state)

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
