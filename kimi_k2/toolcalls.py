"""Kimi K2 tool calls: the text the model writes, parsed whole or streamed, and rendered back.

Wire format (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md; shared/reference/kimi_k2_formats.md §4):

    content<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json}
    <|tool_call_end|>...<|tool_calls_section_end|>

Lenient where real outputs vary (§4.4): the singular `<|tool_call_section_begin|>` markers, ids `functions.x:0` and
`x:0`, whitespace and newlines around markers, pretty-printed JSON, arguments written as a JSON-encoded string
(`"{\\"a\\": 1}"`, unwrapped), a missing section end or call end. Strict where a silent guess would be wrong: a call
whose arguments are not a JSON object, whose id is malformed or that is cut off is still returned, with `error` set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
MARKERS: dict[str, str] = {
    SECTION_BEGIN: "section_begin",
    "<|tool_call_section_begin|>": "section_begin",  # singular variant seen in the wild (llama.cpp PR #17376)
    SECTION_END: "section_end",
    "<|tool_call_section_end|>": "section_end",
    CALL_BEGIN: "call_begin",
    ARG_BEGIN: "arg_begin",
    CALL_END: "call_end",
}
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
_ID_RE = re.compile(r"(?:functions\.)?(?P<name>[^\s:]+):(?P<idx>\d+)")


class ToolCallError(ValueError):
    pass


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object, as the model wrote it (surrounding whitespace stripped)
    error: str | None = None  # why the call is malformed; None for a well-formed call

    def parsed_arguments(self) -> dict[str, Any]:
        if self.error is not None:
            raise ToolCallError(f"tool call {self.id!r}: {self.error}")
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_call_id(name: str, index: int) -> str:
    return f"functions.{name}:{index}"


def _parse_id(raw: str) -> tuple[str, str, str | None]:
    """-> (id, name, error)."""
    call_id = raw.strip()
    m = _ID_RE.fullmatch(call_id)
    if m:
        return call_id, m["name"], None
    name = call_id.removeprefix("functions.")
    return call_id, name, f"malformed tool-call id {call_id!r}: expected functions.NAME:INDEX"


def _parse_arguments(raw: str) -> tuple[str, str | None]:
    """-> (arguments JSON text, error). A JSON string holding a JSON object is unwrapped (Kimi-K2 issue #26)."""
    text = raw.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return text, f"arguments are not valid JSON ({e})"
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except json.JSONDecodeError as e:
            return text, f"arguments are a JSON string that does not hold JSON ({e})"
        if isinstance(inner, dict):
            return value.strip(), None
        value = inner
    if not isinstance(value, dict):
        return text, f"arguments must be a JSON object, got {type(value).__name__}"
    return text, None


class ToolCallStreamParser:
    """Feed model text in deltas of any size; get OpenAI-style deltas back:
    `{"content": str}`, then per call `{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
    "arguments": ""}}]}` followed by `{"tool_calls": [{"index", "function": {"arguments": diff}}]}`.
    Concatenated, the deltas give exactly `parse(all text)`; `finish()` ends the stream. Marker text never reaches
    content: a delta ending in what may be the start of a marker is held back until it is decided."""

    def __init__(self) -> None:
        self.content = ""
        self.calls: list[ToolCall] = []
        self._state = "content"  # content | section | id | args
        self._pending = ""
        self._id = ""
        self._args = ""
        self._start: int | None = None  # where the open call's arguments start (leading whitespace skipped)
        self._sent = 0  # characters of the open call's arguments already streamed
        self._header: tuple[str, str, str | None] | None = None
        self._out: list[dict[str, Any]] = []

    @property
    def in_tool_section(self) -> bool:
        return self._state != "content"

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._pending += text
        while (m := _MARKER_RE.search(self._pending)) is not None:
            self._text(self._pending[: m.start()])
            self._marker(MARKERS[m.group()])
            self._pending = self._pending[m.end():]
        cut = self._pending.rfind("<")
        if cut < 0 or not any(marker.startswith(self._pending[cut:]) for marker in MARKERS):
            cut = len(self._pending)
        self._text(self._pending[:cut])
        self._pending = self._pending[cut:]
        return self._take()

    def finish(self) -> list[dict[str, Any]]:
        self._text(self._pending)
        self._pending = ""
        if self._state == "id":
            self._close(truncated=True)
        elif self._state == "args":
            self._close()
        self._state = "content"
        return self._take()

    # ---- the state machine ------------------------------------------------------------------------------
    def _text(self, text: str) -> None:
        if not text:
            return
        if self._state == "content":
            self.content += text
            self._out.append({"content": text})
        elif self._state == "id":
            self._id += text
        elif self._state == "args":
            self._args += text
            if self._start is None and self._args.strip():
                self._start = len(self._args) - len(self._args.lstrip())
            # a JSON-encoded string is held back and sent unwrapped at the end; trailing whitespace waits
            if self._start is not None and self._args[self._start] != '"':
                self._send(self._args[self._start + self._sent:].rstrip())
        # text between calls inside a section (whitespace) is dropped

    def _marker(self, kind: str) -> None:
        state = self._state
        if kind == "section_begin":
            if state == "content":
                self._state = "section"
        elif kind == "call_begin":
            if state in ("id", "args"):
                self._close(truncated=state == "id")
            self._state, self._id, self._args, self._start, self._sent, self._header = "id", "", "", None, 0, None
        elif kind == "arg_begin":
            if state == "id":
                self._header = _parse_id(self._id)
                self._emit_header()
                self._state = "args"
            elif state == "args":
                self._args += ARG_BEGIN  # marker inside arguments: kept, so the JSON check reports it
        elif kind == "call_end":
            if state in ("id", "args"):
                self._close(truncated=state == "id")
                self._state = "section"
        elif kind == "section_end":
            if state in ("id", "args"):
                self._close(truncated=state == "id")
            self._state = "content"

    def _emit_header(self) -> None:
        assert self._header is not None
        call_id, name, _ = self._header
        self._out.append({"tool_calls": [{"index": len(self.calls), "id": call_id, "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})

    def _send(self, diff: str) -> None:
        if diff:
            self._out.append({"tool_calls": [{"index": len(self.calls), "function": {"arguments": diff}}]})
            self._sent += len(diff)

    def _close(self, truncated: bool = False) -> None:
        if self._header is None:
            self._header = _parse_id(self._id)
            self._emit_header()
        call_id, name, error = self._header
        args, args_error = _parse_arguments(self._args)
        if truncated:
            error = error or "tool call has no arguments (no <|tool_call_argument_begin|>)"
        error = error or args_error
        self._send(args[self._sent:])  # what was streamed is a prefix of `args` (nothing for an unwrapped string)
        self.calls.append(ToolCall(call_id, name, args, error))
        self._state = "section"

    def _take(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for d in self._out:
            if out and "content" in d and "content" in out[-1]:
                out[-1] = {"content": out[-1]["content"] + d["content"]}
            else:
                out.append(d)
        self._out = []
        return out


def parse(text: str) -> tuple[str, list[ToolCall]]:
    """Split model output into (content, tool calls). Content is the text outside tool-call sections."""
    p = ToolCallStreamParser()
    p.feed(text)
    p.finish()
    return p.content, p.calls


def render(calls: Sequence[ToolCall | dict[str, Any]]) -> str:
    """The exact text K2 writes for these calls (and the chat template renders for them in history).
    A call is a ToolCall or an OpenAI tool call `{"id", "function": {"name", "arguments": str | object}}`;
    a missing id becomes `functions.{name}:{position}`."""
    if not calls:
        return ""
    parts = [SECTION_BEGIN]
    for i, c in enumerate(calls):
        if isinstance(c, ToolCall):
            if c.error is not None:
                raise ValueError(f"cannot render malformed tool call {c.id!r}: {c.error}")
            call_id, name, args = c.id, c.name, c.arguments
        else:
            fn = c.get("function") or {}
            name, args = fn.get("name"), fn.get("arguments", {})
            if not isinstance(name, str) or not name:
                raise ValueError(f"tool call {i} has no function.name: {c!r}")
            call_id = c.get("id") or tool_call_id(name, i)
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)  # as the chat template's `tojson`
        id_name = _parse_id(call_id)
        if id_name[2] is not None or id_name[1] != name:
            raise ValueError(f"tool call id {call_id!r} does not name function {name!r} (functions.{name}:N)")
        if _MARKER_RE.search(args):
            raise ValueError(f"arguments of tool call {call_id!r} contain tool-call marker text")
        parts.append(f"{CALL_BEGIN}{call_id}{ARG_BEGIN}{args}{CALL_END}")
    parts.append(SECTION_END)
    return "".join(parts)
