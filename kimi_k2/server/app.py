"""The ASGI app: both APIs, /health, /metrics, API keys, body size limit, and errors in each API's own envelope.

Paths under /v1/messages speak Anthropic's error format, everything else OpenAI's. Any exception that escapes a
route is reported as that API's 500 error; routes validate input first, so request content cannot reach it.
With an API key set, every path but /health and the API docs needs it, /metrics too unless `public_metrics`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from kimi_k2.server import anthropic_api, completions_api, openai_api, responses_api
from kimi_k2.server.errors import APIError, anthropic_error, openai_error
from kimi_k2.server.openapi import Health, RouteDoc, document, openapi_schema
from kimi_k2.server.state import ServerState

log = logging.getLogger("kimi_k2.server")
OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc")
UNCOUNTED = (*OPEN_PATHS, "/metrics")
API_PATHS = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/v1/messages",
             "/v1/messages/count_tokens"}
TRIM_AFTER_BYTES = 1 << 20
document("get", "/health", RouteDoc("open", ok=Health))
document("get", "/metrics", RouteDoc("openai", errors=(401,), ok_media="text/plain"))


def error_json(path: str, e: APIError) -> JSONResponse:
    body = anthropic_error(e) if path.startswith("/v1/messages") else openai_error(e)
    headers = dict(e.headers or {})
    if e.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=e.status, headers=headers)


def presented_keys(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """Every credential the client sent: `x-api-key` values and `Authorization: Bearer` tokens, as raw bytes (a
    non-ASCII key arrives as UTF-8)."""
    keys = []
    for name, value in headers:
        name = name.lower()
        if name == b"x-api-key":
            keys.append(value.strip())
        elif name == b"authorization" and value[:7].lower() == b"bearer ":
            keys.append(value[7:].strip())
    return keys


def glibc_malloc_trim():
    """glibc's `malloc_trim` (None on other C libraries). glibc raises its mmap threshold to the largest block freed
    (up to 32 MiB), so after one multi-MB request body the next ones are carved from the heap and kept after they
    are freed: without a trim, a burst of big bodies leaves RSS tens of MB above its baseline for good."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = glibc_malloc_trim()


class Guard:
    """Pure ASGI middleware (so routes still see client disconnects): API key check, the body size limit (413
    from Content-Length before reading anything, or as soon as a chunked body passes it), request counts, and the
    memory of a big body handed back to the OS once its request is done."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state
        self.key = state.api_key.encode() if state.api_key else None
        self.open_paths = OPEN_PATHS + (("/metrics",) if state.public_metrics else ())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, metrics = scope["path"], self.state.metrics
        label = path if path in API_PATHS else "other"  # bounded label set, no client text in /metrics
        counted = not path.startswith(UNCOUNTED)

        async def reply(e: APIError):
            if counted:
                metrics.requests[(label, e.status)] += 1
            await error_json(path, e)(scope, receive, send)

        if self.key is not None and not path.startswith(self.open_paths):
            if not any(hmac.compare_digest(k, self.key) for k in presented_keys(scope["headers"])):
                return await reply(APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY' or "
                                                 "'x-api-key: KEY')", code="invalid_api_key"))
        limit = self.state.limits.max_request_bytes
        too_large = APIError(413, f"the request body is over this server's limit of {limit} bytes",
                             code="request_too_large")
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            return await reply(too_large)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            return message

        async def counting_send(message):
            if message["type"] == "http.response.start" and counted:
                metrics.requests[(label, message["status"])] += 1
            await send(message)

        try:
            await self.app(scope, limited_receive, counting_send)
        finally:
            if received > TRIM_AFTER_BYTES and MALLOC_TRIM is not None:  # its buffers are freed: give the memory back
                asyncio.get_running_loop().run_in_executor(self.state.prep, MALLOC_TRIM, 0)


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
    app.include_router(completions_api.router)
    app.include_router(responses_api.router)
    app.include_router(anthropic_api.router)
    app.openapi = lambda: openapi_schema(app)

    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return error_json(request.url.path, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404, 405 (its Allow header kept)
        return error_json(request.url.path, APIError(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_json(request.url.path, APIError(500, f"internal error: {type(e).__name__}"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": state.model_names}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return state.metrics.render(state.engine.stats())

    return app
