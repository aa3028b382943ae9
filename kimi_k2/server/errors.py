"""API errors, rendered in each API's own envelope.

OpenAI: `{"error": {"message", "type", "param", "code"}}`; Anthropic: `{"type": "error", "error": {"type", "message"}}`
(https://platform.claude.com/docs/en/api/errors). The HTTP status is the same for both.
"""

from __future__ import annotations

import re

from kimi_k2.engine.async_engine import EngineOverloadedError, RequestTimeoutError

OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                500: "internal_error", 503: "service_unavailable_error", 504: "timeout_error"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                   405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                   503: "overloaded_error", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def engine_failure(e: Exception) -> APIError:
    """The engine could not finish a request: a full queue (429), its time limit (504), or a failure (500)."""
    if isinstance(e, EngineOverloadedError):
        return APIError(429, f"the server is busy: {e}", code="queue_full", headers={"Retry-After": "1"})
    if isinstance(e, RequestTimeoutError):
        return APIError(504, f"{e}; the server's per-request time limit ends it", code="request_timeout")
    return APIError(500, f"generation failed: {e}", code="generation_failed")


def openai_error(e: APIError) -> dict:
    kind = OPENAI_TYPES.get(e.status, "invalid_request_error")
    return {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}


def anthropic_error(e: APIError) -> dict:
    kind = ANTHROPIC_TYPES.get(e.status, "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


def pydantic_message(errors: list[dict]) -> tuple[str, str | None]:
    """First validation error of a pydantic/FastAPI error list as (message, dotted field name)."""
    if not errors:
        return "invalid request body", None
    err = errors[0]
    # field names are snake_case; other parts name union members (e.g. "literal['none','auto']", "NamedToolChoice")
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and re.fullmatch(r"[a-z_][a-z0-9_]*|\d+", str(p))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}", None
    return (f"{param}: {msg}" if param else msg), param
