"""OpenAI Responses API: POST /v1/responses, streamed or not (https://platform.openai.com/docs/api-reference/responses).

Input items become a chat conversation: `instructions` a system turn; messages by role (developer -> system); a
reasoning item, the assistant message and the function_call items after it one assistant turn (reasoning_content,
content, tool_calls); each function_call_output a tool turn answering its call_id. Output items come from the same
generation events as the chat API: a reasoning item (reasoning_text content) when the model reasoned, a message
(output_text), then one function_call item per valid call; streamed in OpenAI's order: response.created,
response.in_progress, per item output_item.added -> content_part.added -> deltas -> *.done -> content_part.done ->
output_item.done, then response.completed (response.incomplete when max_output_tokens cut it), every event with its
sequence_number.

Stateless: nothing is stored, so `store` is answered false, GET /v1/responses/{id} is 404, and a request that needs
stored state (previous_response_id, conversation, background, prompt) is a 400 that names the field.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from kimi_k2.engine import SamplingParams, TokenLogprob
from kimi_k2.server import conversation
from kimi_k2.server import responses_protocol as rp
from kimi_k2.server.errors import APIError, engine_failure
from kimi_k2.server.generation import FinishEvent, Generation, ReasoningEvent, Sample, TextEvent, ToolEvent
from kimi_k2.server.grammar import ToolPlan, lark_grammar
from kimi_k2.server.openai_api import chat_logprobs
from kimi_k2.server.openapi import GENERATION_ERRORS, ResponseObject, ResponsesStreamEvent, RouteDoc, document
from kimi_k2.server.state import (
    ServerState,
    account,
    client_gone,
    collected,
    parse_body,
    request_id,
    start_generation,
)

router = APIRouter()
document("post", "/v1/responses",
         RouteDoc("openai", rp.ResponsesRequest, ResponseObject, ResponsesStreamEvent, GENERATION_ERRORS))
document("get", "/v1/responses/{response_id}", RouteDoc("openai", errors=(401, 404)))
STATEFUL = ("previous_response_id", "conversation", "background", "prompt")


def _text(parts: str | list[rp.InputText], where: str) -> str:
    if isinstance(parts, str):
        return parts
    out = []
    for j, p in enumerate(parts):
        if p.type in ("input_image", "input_file", "input_audio"):
            raise APIError(400, f"{where}[{j}]: content type {p.type!r} is not supported (text-only model)", where)
        out.append(p.text if p.text is not None else p.refusal or "")
    return "".join(out)


def input_messages(body: rp.ResponsesRequest) -> list[dict]:
    """`instructions` + `input` -> chat-template messages (OpenAI chat shape, reasoning_content on assistants)."""
    out: list[dict] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        return [*out, {"role": "user", "content": body.input}]
    names: dict[str, str] = {}  # call_id -> function name, for the tool turns
    reasoning: str | None = None  # a reasoning item waiting for the assistant turn it belongs to

    def assistant() -> dict:
        nonlocal reasoning
        if out and out[-1]["role"] == "assistant" and not out[-1].get("_closed"):
            return out[-1]
        turn: dict = {"role": "assistant", "content": ""}
        if reasoning is not None:
            turn["reasoning_content"], reasoning = reasoning, None
        out.append(turn)
        return turn

    for i, item in enumerate(body.input):
        where = f"input[{i}]"
        if isinstance(item, rp.MessageItem):
            text = _text(item.content, f"{where}.content")
            if item.role == "assistant":
                turn = assistant()
                if turn.get("tool_calls"):  # text after calls starts a new turn
                    turn["_closed"] = True
                    turn = assistant()
                turn["content"] += text
            else:
                out.append({"role": "system" if item.role == "developer" else item.role, "content": text})
        elif isinstance(item, rp.ReasoningItem):
            parts = item.content if item.content else item.summary
            reasoning = (reasoning or "") + _text(parts, f"{where}.content")
        elif isinstance(item, rp.FunctionCallItem):
            names[item.call_id] = item.name
            assistant().setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, rp.FunctionCallOutputItem):
            if item.call_id not in names:
                raise APIError(400, f"{where}: function_call_output call_id {item.call_id!r} answers no earlier "
                                    "function_call in the input", f"{where}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id, "name": names[item.call_id],
                        "content": _text(item.output, f"{where}.output")})
        else:
            raise APIError(400, f"{where}: input item type {item.type!r} is not supported (this server keeps no "
                                "state and runs no hosted tools)", f"{where}.type")
    for m in out:
        m.pop("_closed", None)
    if not any(m["role"] in ("user", "tool") for m in out):
        raise APIError(400, "input has no user message or function_call_output to answer", "input")
    return out


def request_tools(st: ServerState, body: rp.ResponsesRequest, messages: list[dict]
                  ) -> tuple[list[dict] | None, ToolPlan | None, dict | None]:
    """-> (template tools, ToolPlan, response JSON schema), through the chat path's own checks."""
    text_schema = None
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_object":
        text_schema = conversation.ANY_OBJECT
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format.schema is required for type 'json_schema'", "text.format.schema")
        text_schema = fmt.schema_
    defs = []
    for i, t in enumerate(body.tools or ()):
        if t.type != "function":
            raise APIError(400, f"tools[{i}]: tool type {t.type!r} is not supported; only function tools run here "
                                "(hosted tools are OpenAI's)", f"tools[{i}].type")
        if t.name is None:
            raise APIError(400, f"tools[{i}]: a function tool needs a name", f"tools[{i}].name")
        defs.append((t.name, t.description, t.parameters))
    choice, named = body.tool_choice, None
    if isinstance(choice, rp.NamedFunction):
        if choice.type != "function" or choice.name is None:
            raise APIError(400, f"tool_choice {choice.model_dump(exclude_none=True)} is not supported: use none, auto, "
                                "required or {\"type\": \"function\", \"name\": ...}", "tool_choice")
        choice, named = None, choice.name
    lim = st.limits
    try:
        return conversation.tool_setup(defs, choice, named, body.parallel_tool_calls, text_schema, messages,
                                       st.compiler, lim.max_tools, lim.max_schema_bytes, "text.format.schema")
    except ValueError as e:
        raise APIError(400, str(e)) from None


def prepare_response(st: ServerState, raw: bytes):
    body = parse_body(rp.ResponsesRequest, raw)
    st.check_model(body.model)
    for name in STATEFUL:
        if getattr(body, name) not in (None, False):
            raise APIError(400, f"{name} is not supported: this server stores no responses (store is always false); "
                                "send the whole conversation as input items", name)
    messages = input_messages(body)
    st.check_prompt_chars(sum(len(m["content"]) + len(m.get("reasoning_content", "")) for m in messages), "input")
    tools, plan, text_schema = request_tools(st, body, messages)
    prompt = st.encode_chat(messages, tools)
    try:
        constraint = st.compiler.constraint(lark_grammar(plan, text_schema, st.reasoning))
    except ValueError as e:
        raise APIError(400, str(e)) from None
    max_tokens = st.max_tokens(len(prompt), body.max_output_tokens, "max_output_tokens", "input")
    t = body.temperature
    params = SamplingParams(max_tokens=max_tokens, temperature=1.0 if t is None else t, top_p=body.top_p or 1.0,
                            seed=body.seed, logprobs=body.top_logprobs, constraint=constraint)
    return body, prompt, plan, params


@router.post("/v1/responses")
async def create_response(request: Request):
    st: ServerState = request.app.state.k2
    body, gen = await start_generation(st, request, prepare_response, "resp_")
    shell = response_shell(body, gen)
    if body.stream:
        return StreamingResponse(stream(st, gen, shell), media_type="text/event-stream")
    samples = await collected(st, gen, request)
    if samples is None:
        return client_gone(st)
    s = samples[0]
    return finished(shell, gen, output_items(st, s), s.finish)


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str):
    raise APIError(404, f"response {response_id!r} not found: this server stores no responses (store is false)",
                   "response_id", "not_found")


def response_shell(body: rp.ResponsesRequest, gen: Generation) -> dict:
    """The response object without output, as `response.created` carries it."""
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else \
        {"type": "text"}
    choice = body.tool_choice
    return {
        "id": gen.request_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": body.model, "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": None,
        "reasoning": {"effort": (body.reasoning or {}).get("effort"), "summary": None}, "store": False,
        "temperature": body.temperature, "text": {"format": fmt}, "top_p": body.top_p,
        "tool_choice": choice.model_dump(exclude_none=True) if isinstance(choice, rp.NamedFunction) else
        choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()], "truncation": "disabled",
        "usage": None, "user": body.user, "metadata": body.metadata or {},
    }


def usage(gen: Generation, finish: FinishEvent | None) -> dict:
    done = sum(gen.completion_tokens)
    return {"input_tokens": gen.prompt_tokens, "input_tokens_details": {"cached_tokens": gen.cached_tokens},
            "output_tokens": done,
            "output_tokens_details": {"reasoning_tokens": finish.reasoning_tokens if finish is not None else 0},
            "total_tokens": gen.prompt_tokens + done}


def finished(shell: dict, gen: Generation, output: list[dict], finish: FinishEvent | None) -> dict:
    cut = finish is not None and finish.reason == "length"
    return {**shell, "status": "incomplete" if cut else "completed", "output": output,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "usage": usage(gen, finish)}


def text_logprobs(st: ServerState, lps: list[TokenLogprob] | None) -> list[dict]:
    return chat_logprobs(st, lps)["content"] if lps else []


def reasoning_item(text: str, status: str = "completed") -> dict:
    return {"id": request_id("rs_"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, logprobs: list[dict], status: str = "completed") -> dict:
    return {"id": request_id("msg_"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": request_id("fc_"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def output_items(st: ServerState, s: Sample) -> list[dict]:
    """reasoning (if any), the message (unless the turn is only tool calls), the function calls."""
    out = [reasoning_item(s.reasoning)] if s.reasoning else []
    if s.text or not s.calls:
        out.append(message_item(s.text, text_logprobs(st, s.logprobs)))
    out += [call_item(c.id, c.name, c.arguments) for c in s.calls]
    return out


def sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


async def stream(st: ServerState, gen: Generation, shell: dict) -> AsyncIterator[str]:
    seq = 0
    output: list[dict] = []
    open_item: dict | None = None  # the item being streamed
    calls: dict[int, dict] = {}  # position in the tool-call section -> its item

    def event(kind: str, **fields) -> str:
        nonlocal seq
        e = {"type": kind, "sequence_number": seq, **fields}
        seq += 1
        return sse(e)

    def part_of(item: dict) -> dict:
        return item["content"][0]

    def close() -> list[str]:
        nonlocal open_item
        if open_item is None:
            return []
        item, idx, out = open_item, len(output) - 1, []
        item["status"] = "completed"
        if item["type"] == "reasoning":
            text = part_of(item)["text"]
            out += [event("response.reasoning_text.done", item_id=item["id"], output_index=idx, content_index=0,
                          text=text),
                    event("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                          part=part_of(item))]
        elif item["type"] == "message":
            out += [event("response.output_text.done", item_id=item["id"], output_index=idx, content_index=0,
                          text=part_of(item)["text"], logprobs=part_of(item)["logprobs"]),
                    event("response.content_part.done", item_id=item["id"], output_index=idx, content_index=0,
                          part=part_of(item))]
        else:
            out.append(event("response.function_call_arguments.done", item_id=item["id"], output_index=idx,
                             name=item["name"], arguments=item["arguments"]))
        out.append(event("response.output_item.done", output_index=idx, item=item))
        open_item = None
        return out

    def open_(item: dict) -> list[str]:
        nonlocal open_item
        out = close()
        output.append(item)
        open_item = item
        idx = len(output) - 1
        added = {**item, "status": "in_progress"}
        if item["type"] in ("reasoning", "message"):
            added["content"] = []
        out.append(event("response.output_item.added", output_index=idx, item=added))
        if item["type"] in ("reasoning", "message"):
            out.append(event("response.content_part.added", item_id=item["id"], output_index=idx, content_index=0,
                             part={**part_of(item), "text": ""}))
        return out

    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    finish: FinishEvent | None = None
    completed = False
    events = gen.events()
    try:
        async for ev in events:
            lps = text_logprobs(st, ev.logprobs)
            if isinstance(ev, ReasoningEvent):
                if open_item is None or open_item["type"] != "reasoning":
                    for chunk in open_(reasoning_item("", "in_progress")):
                        yield chunk
                part_of(open_item)["text"] += ev.text
                yield event("response.reasoning_text.delta", item_id=open_item["id"], output_index=len(output) - 1,
                            content_index=0, delta=ev.text)
            elif isinstance(ev, TextEvent):
                if open_item is None or open_item["type"] != "message":
                    for chunk in open_(message_item("", [], "in_progress")):
                        yield chunk
                part_of(open_item)["text"] += ev.text
                part_of(open_item)["logprobs"] += lps
                yield event("response.output_text.delta", item_id=open_item["id"], output_index=len(output) - 1,
                            content_index=0, delta=ev.text, logprobs=lps)
            elif isinstance(ev, ToolEvent):
                if ev.id is not None:
                    item = call_item(ev.id, ev.name or "", "", "in_progress")
                    calls[ev.call] = item
                    for chunk in open_(item):
                        yield chunk
                item = calls[ev.call]
                if ev.arguments:
                    item["arguments"] += ev.arguments
                    yield event("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=output.index(item), delta=ev.arguments)
            elif isinstance(ev, FinishEvent):
                finish = ev
        valid = {c.id for c in finish.calls} if finish is not None else set()
        for chunk in close():
            yield chunk
        for item in output:  # a call cut short (max_output_tokens) or outside the declared tools: not a call
            if item["type"] == "function_call" and item["call_id"] not in valid:
                item["status"] = "incomplete"
        if not any(item["type"] in ("message", "function_call") for item in output):
            for chunk in open_(message_item("", [], "in_progress")) + close():
                yield chunk
        final = finished(shell, gen, output, finish)
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                    response=final)
        completed = True
    except Exception as e:  # the engine failed or timed out mid-stream: an error event, then response.failed
        err = engine_failure(e)
        yield event("error", code=err.code, message=err.message, param=None)
        yield event("response.failed", response={**shell, "status": "failed", "output": output,
                                                 "error": {"code": err.code or "server_error", "message": err.message}})
        completed = True
    finally:
        if not completed:  # the client left: free the request's pages now
            st.metrics.aborted += 1
            st.engine.abort(gen.request_id)
        await events.aclose()
        account(st, gen)
