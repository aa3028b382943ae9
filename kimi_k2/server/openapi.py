"""What /openapi.json says: each route's request body, its answers (JSON, or an SSE stream), and every error status
it can return, with the real error envelope of its API.

Request bodies are read by the routes themselves (size-limited, parsed off the event loop), so FastAPI does not see
them: `document` records each route's models and `openapi_schema` writes them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = None  # with --reasoning-parser kimi_k2
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TextContent(BaseModel):
    type: Literal["text"]
    text: str


class ThinkingContent(BaseModel):
    type: Literal["thinking"]
    thinking: str
    signature: str


class ToolUseContent(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int


class AnthropicMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ThinkingContent | TextContent | ToolUseContent]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: MessageUsage


class TokenCount(BaseModel):
    input_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    """A Responses API response: output items of type reasoning, message and function_call."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete"]
    model: str
    output: list[dict[str, Any]]
    incomplete_details: dict[str, str] | None
    store: Literal[False]
    usage: ResponseUsage


class ResponsesStreamEvent(BaseModel):
    """One server-sent event of a streamed response: `data` is the JSON object of that `event` type."""

    event: str
    data: str


class OpenAIStreamEvent(BaseModel):
    """One server-sent event: a JSON chunk (chat.completion.chunk / text_completion), an `error`, or `[DONE]`."""

    event: Literal["message"]
    data: str


class AnthropicStreamEvent(BaseModel):
    """One server-sent event: `data` is the JSON object of that `event` type."""

    event: Literal["message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
                   "message_delta", "message_stop", "error"]
    data: str


class Health(BaseModel):
    status: Literal["ok"]
    models: list[str]


ERRORS = {
    400: "invalid request (bad field, unsupported or unsatisfiable schema, prompt too long, ...)",
    401: "missing or wrong API key",
    404: "unknown model (or, for a stored response, none: this server stores none)",
    413: "request body over the server's size limit",
    429: "too many requests queued; retry after the Retry-After seconds",
    500: "generation failed inside the engine",
    504: "the request reached the server's per-request time limit",
}
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 504)


@dataclass
class RouteDoc:
    api: Literal["openai", "anthropic", "open"]
    body: type[BaseModel] | None = None
    ok: type[BaseModel] | None = None
    stream: type[BaseModel] | None = None  # with `stream: true`, 200 is text/event-stream of these events
    errors: tuple[int, ...] = ()
    ok_media: str = "application/json"


ROUTES: dict[tuple[str, str], RouteDoc] = {}


def document(method: str, path: str, doc: RouteDoc) -> None:
    ROUTES[(method.lower(), path)] = doc


def _response(doc: RouteDoc, status: int, refs: dict) -> dict:
    if status == 200:
        content: dict = {doc.ok_media: {"schema": refs[doc.ok] if doc.ok else {"type": "string"}}}
        if doc.stream is not None:
            content["text/event-stream"] = {"schema": refs[doc.stream]}  # OpenAPI 3.1: the schema of each event
        return {"description": "OK (`stream: true`: server-sent events)" if doc.stream else "OK", "content": content}
    error = AnthropicError if doc.api == "anthropic" else OpenAIError
    out: dict = {"description": ERRORS[status], "content": {"application/json": {"schema": refs[error]}}}
    if status == 429:
        out["headers"] = {"Retry-After": {"required": True, "schema": {"type": "integer"},
                                          "description": "seconds to wait before retrying"}}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}
    return out


def openapi_schema(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    models = {OpenAIError, AnthropicError} | {m for d in ROUTES.values() for m in (d.body, d.ok, d.stream)
                                              if m is not None}
    ordered = sorted(models, key=lambda m: m.__qualname__)
    keyed, defs = models_json_schema([(m, "validation") for m in ordered], ref_template="#/components/schemas/{model}")
    refs = {m: keyed[(m, "validation")] for m in ordered}
    components = defs.get("$defs", {})
    for doc in ROUTES.values():  # `model` is one of the names this server serves
        if doc.body is not None:
            name = refs[doc.body]["$ref"].rsplit("/", 1)[1]
            components[name]["properties"]["model"]["enum"] = list(app.state.k2.model_names)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            doc = ROUTES.get((method, path))
            if doc is None:
                continue
            if doc.body is not None:
                operation["requestBody"] = {"required": True,
                                            "content": {"application/json": {"schema": refs[doc.body]}}}
            operation["responses"] = {str(s): _response(doc, s, refs) for s in (200, *doc.errors)}
    app.openapi_schema = schema
    return schema
