"""Kimi-K2-Thinking reasoning: split the text the model writes into reasoning and content, whole or streamed.

K2-Thinking writes `<think>reasoning</think>content` and may then open a tool-call section; it may also open the
section before closing its reasoning (the section start ends the reasoning implicitly), and after a section it may
think again (`<think>` reopens reasoning). Rules (the union of vLLM's `KimiK2ReasoningParser` and SGLang's
`KimiK2Detector`, kimi_k2_formats.md "Beyond the seeds"):

- The text starts inside reasoning (`starts_in_reasoning`, vLLM's default: K2-Thinking's generation prompt leaves
  the model to write `<think>`, and text before any `</think>` is reasoning); a leading `<think>` is consumed.
  With `starts_in_reasoning=False` (SGLang's default) text is content until a `<think>`.
- In reasoning, `</think>` ends it (consumed); a tool-call marker ends it too and stays in the content, where the
  tool-call parser finds the section; a nested `<think>` is dropped.
- In content, `<think>` opens reasoning (consumed) and a stray `</think>` is dropped; inside a tool-call section
  everything is content until the section ends (the tool-call parser judges it).
- Streaming gives exactly what the whole text gives, whatever the delta boundaries: a delta ending in what may be
  the start of a marker is held back until the next delta (or `finish`) decides it.
"""

from __future__ import annotations

import re
from typing import Any

from kimi_k2.toolcalls import MARKERS

THINK_BEGIN = "<think>"
THINK_END = "</think>"
_SECTION_BEGIN = {m for m, kind in MARKERS.items() if kind == "section_begin"}
_SECTION_END = {m for m, kind in MARKERS.items() if kind == "section_end"}
_ALL = [THINK_BEGIN, THINK_END, *MARKERS]
_MARKER_RE = re.compile("|".join(re.escape(m) for m in sorted(_ALL, key=len, reverse=True)))


class ReasoningStreamParser:
    """Feed text deltas of any size; get `{"reasoning": str}` / `{"content": str}` deltas back (adjacent ones of a
    kind merged). `reasoning` and `content` accumulate the whole split; `finish()` flushes the held-back tail."""

    def __init__(self, starts_in_reasoning: bool = True) -> None:
        self.reasoning = ""
        self.content = ""
        self.saw_reasoning = starts_in_reasoning  # a reasoning span was opened (possibly empty)
        self._state = "reasoning" if starts_in_reasoning else "content"  # reasoning | content | section
        self._pending = ""
        self._out: list[dict[str, str]] = []

    @property
    def in_reasoning(self) -> bool:
        return self._state == "reasoning"

    def feed(self, text: str) -> list[dict[str, str]]:
        self._pending += text
        while (m := _MARKER_RE.search(self._pending)) is not None:
            self._text(self._pending[: m.start()])
            self._marker(m.group())
            self._pending = self._pending[m.end():]
        cut = self._pending.rfind("<")
        if cut < 0 or not any(marker.startswith(self._pending[cut:]) for marker in _ALL):
            cut = len(self._pending)
        self._text(self._pending[:cut])
        self._pending = self._pending[cut:]
        return self._take()

    def finish(self) -> list[dict[str, str]]:
        self._text(self._pending)
        self._pending = ""
        return self._take()

    def _text(self, text: str) -> None:
        if not text:
            return
        kind = "reasoning" if self._state == "reasoning" else "content"
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text
        self._out.append({kind: text})

    def _marker(self, marker: str) -> None:
        state = self._state
        if state == "section":
            self._text(marker)
            if marker in _SECTION_END:
                self._state = "content"
        elif marker == THINK_BEGIN:  # in reasoning already (the opening one, or nested): consumed all the same
            self._state, self.saw_reasoning = "reasoning", True
        elif marker == THINK_END:
            self._state = "content"
        else:  # a tool-call marker: content (and the end of any reasoning)
            self._state = "content"
            self._text(marker)
            if marker in _SECTION_BEGIN:
                self._state = "section"

    def _take(self) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for d in self._out:
            if out and d.keys() == out[-1].keys():
                (kind,) = d
                out[-1] = {kind: out[-1][kind] + d[kind]}
            else:
                out.append(d)
        self._out = []
        return out


def split(text: str, starts_in_reasoning: bool = True) -> tuple[str | None, str | None]:
    """-> (reasoning, content) of a whole output: reasoning None when no reasoning span was opened, content None
    when there is none (vLLM's `extract_reasoning` shape)."""
    p = ReasoningStreamParser(starts_in_reasoning)
    p.feed(text)
    p.finish()
    return (p.reasoning if p.saw_reasoning else None), (p.content or None)


def as_reasoning_content(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message whose content still holds `<think>...</think>` (a client that sent the raw output back)
    -> the same message with the reasoning moved to `reasoning_content`, as the chat template expects it."""
    content = message.get("content")
    if message.get("role") != "assistant" or not isinstance(content, str) or THINK_END not in content \
            or message.get("reasoning_content"):
        return message
    reasoning, rest = split(content)
    return {**message, "content": rest or "", "reasoning_content": reasoning or ""}
