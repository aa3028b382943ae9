"""Streaming text of a completion: incremental detokenization, and stop strings cut out before they are sent."""

from __future__ import annotations

from typing import Any, Protocol

from kimi_k2.tokenizer import IncrementalDetokenizer, Tokenizer


class Detokenizer(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class DecodeDiffDetokenizer:
    """Any tokenizer with `decode(ids) -> str`: decode a short window and send what it adds once it is not a
    partial UTF-8 character (a trailing U+FFFD). Window = the tokens since the text last advanced (as vLLM)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already sent; they give the next piece its context
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]


def make_detokenizer(tokenizer: Any) -> Detokenizer:
    """The Kimi tokenizer's own streaming detokenizer, or the decode-diff one for any other tokenizer."""
    if isinstance(tokenizer, Tokenizer):
        return IncrementalDetokenizer(tokenizer)
    return DecodeDiffDetokenizer(tokenizer)


class TextStream:
    """Completion text of one sample. Never sends (part of) a stop string: a tail that could still grow into one is
    held back until it cannot, and text from the first stop string on is dropped."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.detokenizer = make_detokenizer(tokenizer)
        self.stop = [s for s in stop if s]
        self.text = ""
        self.sent = 0  # len of the text already sent; it never ends with a prefix of a stop string
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.text += self.detokenizer.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.text += self.detokenizer.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            final = True
        hold = 0
        if not final:
            for s in self.stop:
                hold = max(hold, next((k for k in range(len(s) - 1, 0, -1) if self.text.endswith(s[:k])), 0))
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out
