"""Chat-template rendering the Hugging Face way, plus the pieces the safe tokenizer and SFT masking need.

`render_pieces` renders a Jinja chat template into (text, from_data) pieces: text the template writes itself
(its role markers) and text that came out of a `{{ ... }}` expression (message content, names, ids, tool JSON).
Joined, the pieces are the rendered prompt; kept apart, they let the tokenizer refuse to turn special-token
text inside client data into special tokens while the template's own markers still become special tokens.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from functools import lru_cache
from importlib import resources
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
_KIMI_ID = re.compile(r"functions\.(?P<name>.+):(?P<idx>\d+)")
_VALUES = "_k2_values"  # render-time variable that collects the expression outputs


class Marker(str):
    """A template variable holding special-token text the template may print as its own marker (`bos_token`, ...)."""


# name -> file of the chat templates shipped with the package (`--chat-template NAME`)
BUILTIN_TEMPLATES = {"kimi_k2": "chat_template.jinja", "kimi_k2_thinking": "chat_template_thinking.jinja"}


def builtin_template(name: str = "kimi_k2") -> str:
    """The K2-Instruct-0905 template (`kimi_k2`) or the Kimi-K2-Thinking one (`kimi_k2_thinking`)."""
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown built-in chat template {name!r}; built in: {sorted(BUILTIN_TEMPLATES)}")
    return resources.files("kimi_k2.tokenizer").joinpath(BUILTIN_TEMPLATES[name]).read_text(encoding="utf-8")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' chat-template `tojson`: json.dumps without Jinja's HTML escaping or key sorting
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@jinja2.pass_context
def _finalize(ctx: jinja2.runtime.Context, value: Any) -> str:
    """Swap each `{{ ... }}` output for a placeholder; the value is kept in the render's `_k2_values` list."""
    text = "" if value is None else str(value)
    values = ctx.get(_VALUES)
    if values is None or isinstance(value, Marker):
        return text
    nonce = values[0]
    if nonce in text:  # a macro's output that already holds placeholders
        return text
    values.append(text)
    return f"\x00{nonce}{len(values) - 1}\x00"


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled in the sandbox chat templates render in (cached); ValueError if it does not compile."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                                        finalize=_finalize)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e} (line {e.lineno})") from e


def deep_sort(x: Any) -> Any:
    """Recursively sort dict keys (tokenization_kimi.py `deep_sort_dict`: tools render with sorted keys)."""
    if isinstance(x, dict):
        return {k: deep_sort(x[k]) for k in sorted(x)}
    if isinstance(x, list):
        return [deep_sort(v) for v in x]
    return x


def _content(content: Any, where: str) -> Any:
    """Text-only list content becomes one string, so no template can print a Python list (vLLM sends '' as a list)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string, a list of parts or null, got {type(content).__name__}")
    for part in content:
        if not isinstance(part, dict) or "type" not in part:
            raise ValueError(f"{where}: each content part must be an object with a 'type', got {part!r}")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ValueError(f"{where}: text part without a string 'text': {part!r}")
        elif part["type"] not in ("image", "image_url"):
            raise ValueError(f"{where}: unsupported content part type {part['type']!r} (text, image, image_url)")
    if all(p["type"] == "text" for p in content):
        return "".join(p["text"] for p in content)
    return content


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validate OpenAI-style messages and return copies ready for the template.

    Tool-call ids that are not Kimi's `functions.{name}:{n}` (e.g. `call_abc`, `search:2`) are renamed to
    `functions.{name}:{n}` with n the call's running index in the conversation, and tool results follow the rename:
    the model was trained on Kimi ids only (kimi_k2_formats.md §4.1, §4.4).
    """
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of message objects, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    renamed: dict[str, str] = {}
    n = 0
    for i, raw in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} must be an object, got {type(raw).__name__}")
        role = raw.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        m = copy.deepcopy(raw)
        m["content"] = _content(m.get("content"), where)
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise ValueError(f"{where}: name must be a string")
        if m.get("tool_calls"):
            if role != "assistant":
                raise ValueError(f"{where}: only assistant messages carry tool_calls (role is {role!r})")
            calls = []
            for j, tc in enumerate(m["tool_calls"]):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise ValueError(f"{where}.tool_calls[{j}]: needs function.name, got {tc!r}")
                args = fn.get("arguments", {})
                if not isinstance(args, (str, dict)):
                    raise ValueError(f"{where}.tool_calls[{j}]: arguments must be a JSON string or an object")
                old = tc.get("id")
                match = _KIMI_ID.fullmatch(old) if isinstance(old, str) else None
                new = old if match and match["name"] == fn["name"] else f"functions.{fn['name']}:{n}"
                if isinstance(old, str) and old != new:
                    renamed[old] = new
                calls.append({"id": new, "type": "function", "function": {"name": fn["name"], "arguments": args}})
                n += 1
            m["tool_calls"] = calls
        if "reasoning_content" in m:  # earlier reasoning, rendered where the template keeps it (K2-Thinking)
            if m["reasoning_content"] is None:
                del m["reasoning_content"]
            elif role != "assistant" or not isinstance(m["reasoning_content"], str):
                raise ValueError(f"{where}: reasoning_content must be a string on an assistant message")
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise ValueError(f"{where}: a tool message needs a string tool_call_id")
            m["tool_call_id"] = renamed.get(m["tool_call_id"], m["tool_call_id"])
        out.append(m)
    return out


def render_pieces(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  add_generation_prompt: bool = True, **kwargs: Any) -> list[tuple[str, bool]]:
    """Render `template`; return [(text, from_data)] whose texts join to the rendered prompt."""
    values: list[str] = [secrets.token_hex(8)]
    try:
        text = compile_template(template).render(messages=messages, tools=deep_sort(tools) if tools else tools,
                                                 add_generation_prompt=add_generation_prompt, **kwargs,
                                                 **{_VALUES: values})
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template failed to render: {e}") from e
    pieces: list[tuple[str, bool]] = []
    for k, part in enumerate(re.split(f"\x00{values[0]}(\\d+)\x00", text)):
        text_k = values[int(part)] if k % 2 else part
        if text_k:
            pieces.append((text_k, bool(k % 2)))
    return pieces

