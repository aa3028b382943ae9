"""Anthropic-compatible routes: /v1/messages (streaming and not) and /v1/messages/count_tokens.

Temperature is mapped as Moonshot's own Anthropic endpoint does: real = requested * 0.6 (MoonshotAI/Kimi-K2
README §4), so Anthropic's default 1.0 becomes K2's recommended 0.6. With `--reasoning-parser kimi_k2` the reasoning
comes first as a `thinking` block (streamed as thinking_delta events; its `signature` is empty: nothing here checks
one), and thinking blocks sent back in an assistant turn become that turn's reasoning in the prompt. The request's
`thinking` setting is accepted; K2-Thinking always reasons.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kimi_k2.engine import SamplingParams
from kimi_k2.server import anthropic_protocol as ap
from kimi_k2.server import conversation
from kimi_k2.server.errors import APIError, anthropic_error, engine_failure
from kimi_k2.server.generation import FinishEvent, Generation, ReasoningEvent, TextEvent, ToolEvent, arguments_object
from kimi_k2.server.grammar import ToolPlan, lark_grammar
from kimi_k2.server.openapi import (
    GENERATION_ERRORS,
    AnthropicMessage,
    AnthropicStreamEvent,
    RouteDoc,
    TokenCount,
    document,
)
from kimi_k2.server.state import (
    ServerState,
    account,
    client_gone,
    collected,
    parse_body,
    read_body,
    start_generation,
)

router = APIRouter()
document("post", "/v1/messages",
         RouteDoc("anthropic", ap.MessagesRequest, AnthropicMessage, AnthropicStreamEvent, GENERATION_ERRORS))
document("post", "/v1/messages/count_tokens",
         RouteDoc("anthropic", ap.CountTokensRequest, TokenCount, errors=(400, 401, 404, 413, 429)))
TEMPERATURE_SCALE = 0.6
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def stop_reason(f: FinishEvent | None) -> tuple[str, str | None]:
    if f is None:
        return "end_turn", None
    if f.stop_sequence is not None:
        return "stop_sequence", f.stop_sequence
    return STOP_REASONS[f.reason], None


def prepare(st: ServerState, body: ap.CountTokensRequest) -> tuple[list[int], ToolPlan | None]:
    st.check_model(body.model)
    lim = st.limits
    try:
        messages = conversation.anthropic_messages(body)
        st.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        tools, plan = conversation.anthropic_tools(body, messages, st.compiler, lim.max_tools, lim.max_schema_bytes)
        return st.encode_chat(messages, tools), plan
    except ValueError as e:
        raise APIError(400, str(e)) from None


def prepare_count(st: ServerState, raw: bytes) -> int:
    prompt, _ = prepare(st, parse_body(ap.CountTokensRequest, raw))
    return len(prompt)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> dict:
    st: ServerState = request.app.state.k2
    with st.admission.waiting():
        return {"input_tokens": await st.off_loop(prepare_count, st, await read_body(request))}


def prepare_messages(st: ServerState, raw: bytes) -> tuple[ap.MessagesRequest, list[int], ToolPlan | None,
                                                          SamplingParams]:
    body = parse_body(ap.MessagesRequest, raw)
    prompt, plan = prepare(st, body)
    stop = list(body.stop_sequences or [])
    st.check_stop(stop, "stop_sequences")
    if plan is not None and plan.mode == "required":
        stop = []  # the whole reply is one tool_use section: stop sequences, which cut text, do not apply
    try:
        constraint = st.compiler.constraint(lark_grammar(plan, None, st.reasoning))
    except ValueError as e:
        raise APIError(400, str(e)) from None
    t = 1.0 if body.temperature is None else body.temperature
    params = SamplingParams(max_tokens=st.max_tokens(len(prompt), body.max_tokens), temperature=t * TEMPERATURE_SCALE,
                            top_p=body.top_p or 1.0, top_k=body.top_k or 0, stop=stop, constraint=constraint)
    return body, prompt, plan, params


@router.post("/v1/messages")
async def messages(request: Request):
    st: ServerState = request.app.state.k2
    body, gen = await start_generation(st, request, prepare_messages, "msg_")
    if body.stream:
        return StreamingResponse(stream(st, gen, body.model), media_type="text/event-stream")
    samples = await collected(st, gen, request)
    if samples is None:
        return client_gone(st)
    (s,) = samples
    content: list[dict] = [{"type": "thinking", "thinking": s.reasoning, "signature": ""}] if s.reasoning else []
    if s.text or not s.calls:
        content.append({"type": "text", "text": s.text})
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": arguments_object(c.arguments)}
                for c in s.calls]
    reason, seq = stop_reason(s.finish)
    return {"id": gen.request_id, "type": "message", "role": "assistant", "model": body.model, "content": content,
            "stop_reason": reason, "stop_sequence": seq, "usage": usage(gen)}


def usage(gen: Generation) -> dict:
    return {"input_tokens": gen.prompt_tokens, "output_tokens": sum(gen.completion_tokens),
            "cache_read_input_tokens": gen.cached_tokens, "cache_creation_input_tokens": 0}


def event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def stream(st: ServerState, gen: Generation, model: str) -> AsyncIterator[str]:
    """message_start, ping, per block start/delta.../stop, message_delta, message_stop."""
    finished = False
    events = gen.events()
    try:
        yield event("message_start", {"message": {
            "id": gen.request_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {**usage(gen), "output_tokens": 0}}})
        yield event("ping", {})
        block, kind, last_call, any_call = -1, None, None, False  # open block index and type
        async for ev in events:
            if isinstance(ev, ReasoningEvent):
                if kind != "thinking":
                    if kind is not None:
                        yield event("content_block_stop", {"index": block})
                    block, kind = block + 1, "thinking"
                    yield event("content_block_start", {"index": block, "content_block": {
                        "type": "thinking", "thinking": "", "signature": ""}})
                yield event("content_block_delta", {"index": block, "delta": {
                    "type": "thinking_delta", "thinking": ev.text}})
            elif isinstance(ev, TextEvent):
                if kind != "text":
                    if kind is not None:
                        yield event("content_block_stop", {"index": block})
                    block, kind = block + 1, "text"
                    yield event("content_block_start", {"index": block, "content_block": {"type": "text", "text": ""}})
                yield event("content_block_delta", {"index": block, "delta": {"type": "text_delta", "text": ev.text}})
            elif isinstance(ev, ToolEvent):
                if ev.id is not None or kind != "tool_use" or ev.call != last_call:
                    if kind is not None:
                        yield event("content_block_stop", {"index": block})
                    block, kind, last_call, any_call = block + 1, "tool_use", ev.call, True
                    yield event("content_block_start", {"index": block, "content_block": {
                        "type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}})
                if ev.arguments:
                    yield event("content_block_delta", {"index": block, "delta": {
                        "type": "input_json_delta", "partial_json": ev.arguments}})
            elif isinstance(ev, FinishEvent):
                if kind in (None, "thinking") and not any_call:  # always a text block when no tool was used
                    if kind is not None:
                        yield event("content_block_stop", {"index": block})
                    block, kind = block + 1, "text"
                    yield event("content_block_start", {"index": block, "content_block": {"type": "text", "text": ""}})
                if kind is not None:
                    yield event("content_block_stop", {"index": block})
                reason, seq = stop_reason(ev)
                yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": seq},
                                              "usage": {"output_tokens": sum(gen.completion_tokens)}})
        yield event("message_stop", {})
        finished = True
    except Exception as e:  # the engine failed or timed out mid-stream: an `error` event, as Anthropic's API sends
        yield f"event: error\ndata: {json.dumps(anthropic_error(engine_failure(e)))}\n\n"
        finished = True
    finally:
        if not finished:
            st.metrics.aborted += 1
            st.engine.abort(gen.request_id)
        await events.aclose()
        account(st, gen)
