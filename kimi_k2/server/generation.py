"""One request's generation as API-neutral events: reasoning, text, tool-call name/argument diffs, finish.

Both APIs, streaming or not, are built from these events, so streaming and non-streaming answers agree. Logprobs
travel on the events: each event carries those of the tokens whose text it is the first to show (text a parser holds
back, such as a possible marker, takes its tokens' logprobs along), and the finish event any left (a stop token).
With reasoning on, the text first goes through the kimi_k2 reasoning parser: `<think>` spans become ReasoningEvents
and the rest goes on to the tool-call parser.
Tool calls are parsed from the text by the K2 codec; a call naming an undeclared tool or with arguments that fail
its schema is never reported as a call (it is dropped, and the finish reason is not `tool_calls`). With the
grammar in place (any request with tools) that only happens when `max_tokens` cuts a call short.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from kimi_k2.engine import CompletionDelta, SamplingParams, TokenLogprob
from kimi_k2.reasoning import ReasoningStreamParser
from kimi_k2.server.grammar import GrammarCompiler, ToolPlan
from kimi_k2.toolcalls import ToolCallStreamParser


@dataclass
class TextEvent:
    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ReasoningEvent:
    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class ToolEvent:
    index: int
    call: int  # position of the call in this sample's section
    id: str | None  # first event of a call carries id and name, later ones argument diffs
    name: str | None
    arguments: str
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Call:
    id: str
    name: str
    arguments: str


@dataclass
class FinishEvent:
    index: int
    reason: str  # stop | length | tool_calls
    completion_tokens: int
    calls: list[Call]  # the valid calls, in order
    stop_sequence: str | None = None
    logprobs: list[TokenLogprob] | None = None
    reasoning_tokens: int = 0  # completion tokens generated inside the reasoning span


Event = TextEvent | ReasoningEvent | ToolEvent | FinishEvent


@dataclass
class Sample:
    """What one sample streamed, accumulated (the non-streaming answer)."""

    text: str = ""
    reasoning: str | None = None  # None: no reasoning span (reasoning off, or SGLang-style text without <think>)
    calls: list[Call] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishEvent | None = None


class Generation:
    def __init__(self, engine, tokenizer, compiler: GrammarCompiler, prompt_ids: list[int], params: SamplingParams,
                 plan: ToolPlan | None, request_id: str, hidden: re.Pattern | None = None,
                 deadline: float | None = None, reasoning: bool = False):
        self.engine = engine
        self.tokenizer = tokenizer
        self.compiler = compiler
        self.prompt_ids = prompt_ids
        self.params = params
        self.plan = plan
        self.request_id = request_id
        self.hidden = hidden  # chat: special-token text to drop, tool calls parsed; None: raw text (/v1/completions)
        self.deadline = deadline  # time.monotonic() by which the engine ends the request (RequestTimeoutError)
        self.reasoning = reasoning and hidden is not None  # split <think> reasoning from the content (chat only)
        self.prompt_tokens = len(prompt_ids)
        self.cached_tokens = 0
        self.completion_tokens = [0] * params.n
        self._it: AsyncIterator[CompletionDelta] | None = None
        self._first: CompletionDelta | None = None

    async def start(self) -> None:
        """Submit and wait for the first delta: submission errors (ValueError) surface here, before any response."""
        self._it = self.engine.generate(self.prompt_ids, self.params, request_id=self.request_id,
                                        deadline=self.deadline)
        try:
            self._first = await anext(self._it)
        except BaseException:
            await self._it.aclose()
            raise

    async def events(self) -> AsyncIterator[Event]:
        assert self._it is not None, "call start() first"
        n = self.params.n
        parsers = [ToolCallStreamParser() if self.hidden is not None else None for _ in range(n)]
        thinkers = [ReasoningStreamParser() if self.reasoning else None for _ in range(n)]
        ids: list[list[int]] = [[] for _ in range(n)]
        pending: list[list[TokenLogprob]] = [[] for _ in range(n)]  # logprobs whose text has not shown yet
        thinking = [0] * n  # completion tokens generated inside the reasoning span
        async with aclosing(self._it) as it:
            d = self._first
            while d is not None:
                i = d.index
                self.prompt_tokens, self.cached_tokens = d.prompt_tokens, d.cached_prompt_tokens
                self.completion_tokens[i] = d.completion_tokens
                ids[i].extend(d.token_ids)
                pending[i] += d.logprobs or []
                p, r = parsers[i], thinkers[i]
                if r is not None and r.in_reasoning:
                    thinking[i] += len(d.token_ids)
                for ev in self._split(i, d, p, r):
                    if pending[i] and ev.logprobs is None:
                        ev.logprobs, pending[i] = pending[i], []
                    yield ev
                if d.finished:
                    finish = self._finish(d, p, ids[i])
                    finish.logprobs, pending[i], finish.reasoning_tokens = pending[i] or None, [], thinking[i]
                    yield finish
                d = await anext(it, None)

    def _split(self, index: int, d: CompletionDelta, p: ToolCallStreamParser | None,
               r: ReasoningStreamParser | None) -> list[Event]:
        """The events of one engine delta: its text through the reasoning parser (if on), then the tool-call parser
        (chat) or as it is (completions)."""
        if p is None:
            return [TextEvent(index, d.text)] if d.text else []
        text = self.hidden.sub("", d.text)
        parts = [{"content": text}] if r is None else r.feed(text) + (r.finish() if d.finished else [])
        out: list[Event] = []
        for part in parts:
            if "reasoning" in part:
                out.append(ReasoningEvent(index, part["reasoning"]))
            else:
                out += self._parsed(index, p.feed(part["content"]))
        if d.finished:
            out += self._parsed(index, self._drop_cut_headers(p.finish(), p))
        return out

    @staticmethod
    def _drop_cut_headers(deltas: list[dict], parser: ToolCallStreamParser) -> list[dict]:
        """A call cut off before its arguments began is only announced by finish(): never announce it."""
        broken = {i for i, c in enumerate(parser.calls) if c.error is not None}
        return [x for x in deltas if not any(tc.get("id") is not None and tc["index"] in broken
                                             for tc in x.get("tool_calls") or ())]

    def _parsed(self, index: int, deltas: list[dict]) -> list[Event]:
        calls_allowed = self.plan is not None and self.plan.mode != "none"  # else no call can ever be valid
        out: list[Event] = []
        for delta in deltas:
            if delta.get("content"):
                out.append(TextEvent(index, delta["content"]))
            for tc in (delta.get("tool_calls") or ()) if calls_allowed else ():
                fn = tc.get("function") or {}
                out.append(ToolEvent(index, tc["index"], tc.get("id"), fn.get("name"), fn.get("arguments") or ""))
        return out

    def _finish(self, d: CompletionDelta, parser: ToolCallStreamParser | None, ids: list[int]) -> FinishEvent:
        found = parser.calls if parser is not None else []
        calls = [Call(c.id, c.name, c.arguments) for c in found if c.error is None and self.valid(c.name, c.arguments)]
        reason = "length" if d.finish_reason == "length" else "stop"
        if reason == "stop" and calls:
            reason = "tool_calls"
        stop_sequence = None
        if reason == "stop" and self.params.stop and (not ids or ids[-1] not in self.tokenizer.stop_token_ids):
            tail = self.tokenizer.decode(ids)
            hits = [(tail.find(s) + len(s), tail.find(s), s) for s in self.params.stop if s in tail]
            stop_sequence = min(hits)[2] if hits else None  # the one that completed first, as the engine cut
        return FinishEvent(d.index, reason, d.completion_tokens, calls, stop_sequence)

    def valid(self, name: str, arguments: str) -> bool:
        plan = self.plan
        if plan is None or plan.mode == "none" or name not in plan.tools or (plan.only and name != plan.only):
            return False
        return self.compiler.accepts(plan.validators[name], arguments)


async def collect_unless_gone(gen: Generation, gone: Callable[[], Awaitable[bool]],
                              poll_s: float = 0.25) -> list[Sample] | None:
    """collect(gen), aborting the request when `gone()` (the client disconnected) turns true first."""
    task = asyncio.ensure_future(collect(gen))
    while not task.done():
        await asyncio.wait({task}, timeout=poll_s)
        if not task.done() and await gone():
            task.cancel()  # closes the engine stream: the engine aborts the request and frees its pages
            await asyncio.gather(task, return_exceptions=True)
            return None
    return task.result()


async def collect(gen: Generation) -> list[Sample]:
    samples = [Sample(reasoning="" if gen.reasoning else None) for _ in range(gen.params.n)]
    async for ev in gen.events():
        s = samples[ev.index]
        s.logprobs.extend(ev.logprobs or ())
        if isinstance(ev, TextEvent):
            s.text += ev.text
        elif isinstance(ev, ReasoningEvent):
            s.reasoning = (s.reasoning or "") + ev.text
        elif isinstance(ev, FinishEvent):
            s.finish, s.calls = ev, ev.calls
    return samples


def arguments_object(arguments: str) -> dict:
    value = json.loads(arguments)
    return value if isinstance(value, dict) else {"value": value}
