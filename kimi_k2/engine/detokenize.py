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


class StopMatcher:
    """Knuth-Morris-Pratt search for one stop string over streamed text. `state` is the length of the longest prefix
    of the stop string the text fed so far ends with. The failure table is built only as far as `state` has reached,
    so the work is linear in the text fed, whatever the stop string's length."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fail = [0]  # fail[k]: longest proper border of stop[:k + 1]
        self.state = 0

    def _border(self, k: int) -> int:
        s, fail = self.stop, self.fail
        while len(fail) <= k:
            i, j = len(fail), fail[-1]
            while j and s[i] != s[j]:
                j = fail[j - 1]
            fail.append(j + (s[i] == s[j]))
        return fail[k]

    def feed(self, text: str) -> int:
        """End offset in `text` of the first complete occurrence, or -1 (then `state` is up to date)."""
        s, j = self.stop, self.state
        for i, ch in enumerate(text):
            while j and s[j] != ch:
                j = self._border(j - 1)
            if s[j] == ch:
                j += 1
                if j == len(s):
                    self.state = j
                    return i + 1
        self.state = j
        return -1


class TextStream:
    """Completion text of one sample. Never sends (part of) a stop string: a tail that could still grow into one is
    held back until it cannot, and text from the first stop string to complete on is dropped. The check costs
    O(stop strings x new text) per token (StopMatcher)."""

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.detokenizer = make_detokenizer(tokenizer)
        self.matchers = [StopMatcher(s) for s in stop if s]
        self.pending = ""  # text not sent yet: the longest tail that may still start a stop string
        self.stopped = False  # a stop string was found

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self.detokenizer.push(token_id), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self.detokenizer.flush(), final=True)

    def _release(self, new: str, final: bool) -> str:
        base = len(self.pending)
        text = self.pending + new
        hits = []
        for m in self.matchers:
            end = m.feed(new)
            if end >= 0:
                hits.append((base + end, base + end - len(m.stop)))
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)[1]]
        keep = 0 if final else min(len(text), max((m.state for m in self.matchers), default=0))
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep]
