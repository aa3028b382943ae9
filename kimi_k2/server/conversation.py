"""Requests of both APIs -> chat-template messages, a ToolPlan and a response schema (all validated).

Chat-template messages are OpenAI-shaped dicts (role, content, name, tool_calls, tool_call_id, reasoning_content):
the K2 templates render them directly. Anthropic blocks are mapped onto them: `tool_use` -> assistant `tool_calls`,
`tool_result` -> a `tool` message named after the function it answers, `thinking` -> the turn's reasoning_content
(which the K2-Thinking template keeps for the turns of the current tool loop, as it was trained).
"""

from __future__ import annotations

import json

from kimi_k2.reasoning import as_reasoning_content
from kimi_k2.server import anthropic_protocol as ap
from kimi_k2.server import openai_protocol as op
from kimi_k2.server.errors import APIError
from kimi_k2.server.grammar import GrammarCompiler, ToolPlan
from kimi_k2.server.json_schema import normalize_types

ANY_OBJECT = {"type": "object"}


class SchemaBudget:
    """The JSON size of one request's schemas together (tools and response format) stays within `limit` bytes."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def spend(self, schema: object, what: str) -> None:
        self.used += len(json.dumps(schema, ensure_ascii=False).encode())
        if self.used > self.limit:
            raise ValueError(f"{what}: this request's schemas are over {self.limit} bytes of JSON together (the "
                             "server's schema size limit)")


def _text_parts(parts: list, where: str) -> str:
    out = []
    for j, p in enumerate(parts):
        if p.type in ("text", "input_text"):
            out.append(p.text or "")
        else:
            raise ValueError(f"{where}[{j}]: content type {p.type!r} is not supported (text-only model)")
    return "".join(out)


def openai_messages(req: op.ChatCompletionRequest, reasoning: bool = False) -> list[dict]:
    """`reasoning`: the server parses reasoning, so an assistant turn sent back with its raw `<think>...</think>`
    in the content has it moved to reasoning_content, as the template expects."""
    out = []
    for i, m in enumerate(req.messages):
        d: dict = {"role": "system" if m.role == "developer" else m.role}
        c = m.content
        d["content"] = _text_parts(c, f"messages[{i}].content") if isinstance(c, list) else (c or "")
        if m.name:
            d["name"] = m.name
        thought = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if thought is not None:
            if m.role != "assistant":
                raise ValueError(f"messages[{i}].reasoning_content is only allowed on assistant messages")
            d["reasoning_content"] = thought
        elif reasoning:
            d = as_reasoning_content(d)
        if m.role == "tool":
            if not m.tool_call_id:
                raise ValueError(f"messages[{i}].tool_call_id is required for role 'tool'")
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if m.role != "assistant":
                raise ValueError(f"messages[{i}].tool_calls is only allowed on assistant messages")
            d["tool_calls"] = [_call_dict(tc.id, tc.function.name, tc.function.arguments) for tc in m.tool_calls]
        out.append(d)
    return out


def _call_dict(call_id: str | None, name: str, arguments: str | dict) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": call_id or "", "type": "function", "function": {"name": name, "arguments": args}}


def history_calls(messages: list[dict]) -> int:
    """Tool calls already in the conversation: the running K2 id counter continues from here."""
    return sum(len(m.get("tool_calls") or ()) for m in messages)


def _tools(defs: list[tuple[str, str | None, dict | None]], compiler: GrammarCompiler, where: str, max_tools: int,
           budget: SchemaBudget) -> tuple[list[dict], ToolPlan]:
    """(name, description, schema) -> (template tools, ToolPlan in auto mode); rejects duplicates, bad schemas and
    requests over the tool count / schema size limits."""
    if len(defs) > max_tools:
        raise ValueError(f"{where}: {len(defs)} tools given; this server allows at most {max_tools} per request")
    plan = ToolPlan({})
    rendered = []
    for i, (name, desc, schema) in enumerate(defs):
        if name in plan.tools:
            raise ValueError(f"{where}[{i}]: duplicate tool name {name!r}")
        schema = ANY_OBJECT if schema is None else schema
        budget.spend(schema, f"{where}[{i}] ({name}) schema")
        plan.validators[name] = compiler.check_schema(schema, f"{where}[{i}] ({name}) schema")
        plan.tools[name] = schema
        fn = {"name": name, "parameters": schema}
        if desc:
            fn["description"] = desc
        rendered.append({"type": "function", "function": fn})
    return rendered, plan


def openai_tools(req: op.ChatCompletionRequest, messages: list[dict], compiler: GrammarCompiler, max_tools: int,
                 max_schema_bytes: int):
    """-> (template tools or None, ToolPlan or None, response JSON schema or None)."""
    if req.tools is not None and not req.tools:
        raise APIError(400, "tools must not be an empty array: leave it out (or send null) to declare no tools",
                       "tools", "empty_array")
    text_schema = None
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        text_schema = ANY_OBJECT
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ValueError("response_format.json_schema.schema is required for type 'json_schema'")
        text_schema = rf.json_schema.schema_
    defs = [(t.function.name, t.function.description, t.function.parameters) for t in req.tools or ()]
    choice = req.tool_choice
    named = choice.function.name if isinstance(choice, op.NamedToolChoice) else None
    return tool_setup(defs, None if named else choice, named, req.parallel_tool_calls, text_schema, messages,
                      compiler, max_tools, max_schema_bytes, "response_format.json_schema.schema")


def tool_setup(defs: list[tuple[str, str | None, dict | None]], choice: str | None, named: str | None,
               parallel: bool | None, text_schema: dict | None, messages: list[dict], compiler: GrammarCompiler,
               max_tools: int, max_schema_bytes: int, schema_where: str):
    """Declared tools, a tool_choice (none / auto / required, or a `named` tool) and a response schema, checked
    -> (template tools or None, ToolPlan or None, response JSON schema or None). JSON-schema type "int" (sent by
    some clients) is read as "integer"."""
    budget = SchemaBudget(max_schema_bytes)
    if text_schema is not None:
        text_schema = normalize_types(text_schema)
        budget.spend(text_schema, schema_where)
        compiler.check_schema(text_schema, schema_where)
    if not defs:
        if named is not None or choice not in (None, "none"):
            raise ValueError("tool_choice requires a non-empty 'tools' list")
        return None, None, text_schema
    defs = [(name, desc, None if schema is None else normalize_types(schema)) for name, desc, schema in defs]
    rendered, plan = _tools(defs, compiler, "tools", max_tools, budget)
    plan.parallel, plan.first_idx = parallel is not False, history_calls(messages)
    if named is not None:
        if named not in plan.tools:
            raise ValueError(f"tool_choice.function.name: {named!r} is not in 'tools'")
        plan.mode, plan.only = "required", named
    elif choice is not None:
        plan.mode = choice
    if plan.mode == "required" and text_schema is not None:
        raise ValueError("response_format cannot be combined with a required or named tool_choice")
    return rendered, plan, text_schema


def anthropic_messages(req: ap.CountTokensRequest) -> list[dict]:
    out: list[dict] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else "".join(b.text for b in req.system)
        out.append({"role": "system", "content": system})
    names: dict[str, str] = {}  # tool_use id -> tool name, for the tool_result turns
    for i, m in enumerate(req.messages):
        blocks = [ap.TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        text, calls, thoughts = [], [], []
        for j, b in enumerate(blocks):
            where = f"messages[{i}].content[{j}]"
            if isinstance(b, ap.TextBlock):
                text.append(b.text)
            elif isinstance(b, ap.ThinkingBlock):
                if m.role == "assistant" and b.thinking:
                    thoughts.append(b.thinking)
            elif isinstance(b, ap.ToolUseBlock):
                if m.role != "assistant":
                    raise ValueError(f"{where}: tool_use blocks belong to assistant messages")
                names[b.id] = b.name
                calls.append(_call_dict(b.id, b.name, b.input))
            elif isinstance(b, ap.ToolResultBlock):
                if m.role != "user":
                    raise ValueError(f"{where}: tool_result blocks belong to user messages")
                if b.tool_use_id not in names:
                    raise ValueError(f"{where}: tool_use_id {b.tool_use_id!r} does not answer an earlier tool_use")
                content = b.content if isinstance(b.content, str) or b.content is None else \
                    _text_parts(b.content, f"{where}.content")
                if b.is_error:
                    content = f"Error: {content or ''}"
                out.append({"role": "tool", "tool_call_id": b.tool_use_id, "name": names[b.tool_use_id],
                            "content": content or ""})
            else:
                raise ValueError(f"{where}: content type {b.type!r} is not supported (text-only model)")
        if m.role == "assistant":
            d = {"role": "assistant", "content": "".join(text)}
            if thoughts:
                d["reasoning_content"] = "".join(thoughts)
            if calls:
                d["tool_calls"] = calls
            out.append(d)
        elif text or not any(o["role"] == "tool" for o in out[-1:]):
            out.append({"role": "user", "content": "".join(text)})
    return out


def anthropic_tools(req: ap.CountTokensRequest, messages: list[dict], compiler: GrammarCompiler, max_tools: int,
                    max_schema_bytes: int):
    """-> (template tools or None, ToolPlan or None)."""
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice.type != "none":
            raise ValueError("tool_choice requires a non-empty 'tools' list")
        return None, None
    defs = [(t.name, t.description, None if t.input_schema is None else normalize_types(t.input_schema))
            for t in req.tools]
    rendered, plan = _tools(defs, compiler, "tools", max_tools, SchemaBudget(max_schema_bytes))
    plan.first_idx = history_calls(messages)
    if choice is not None:
        plan.parallel = not choice.disable_parallel_tool_use
        if choice.type == "any":
            plan.mode = "required"
        elif choice.type == "tool":
            if choice.name not in plan.tools:
                raise ValueError(f"tool_choice.name: {choice.name!r} is not in 'tools'")
            plan.mode, plan.only = "required", choice.name
        else:
            plan.mode = choice.type
    return rendered, plan
