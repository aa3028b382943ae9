"""One request's generation as API-neutral events: text, tool-call name/argument diffs, logprobs, finish.

Both APIs, streaming or not, are built from these events, so streaming and non-streaming answers agree.
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
from kimi_k2.server.grammar import GrammarCompiler, ToolPlan
from kimi_k2.toolcalls import ToolCallStreamParser


@dataclass
class TextEvent:
    index: int
    text: str


@dataclass
class ToolEvent:
    index: int
    call: int  # position of the call in this sample's section
    id: str | None  # first event of a call carries id and name, later ones argument diffs
    name: str | None
    arguments: str


@dataclass
class LogprobEvent:
    index: int
    logprobs: list[TokenLogprob]


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


Event = TextEvent | ToolEvent | LogprobEvent | FinishEvent


@dataclass
class Sample:
    """What one sample streamed, accumulated (the non-streaming answer)."""

    text: str = ""
    calls: list[Call] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishEvent | None = None


class Generation:
    def __init__(self, engine, tokenizer, compiler: GrammarCompiler, prompt_ids: list[int], params: SamplingParams,
                 plan: ToolPlan | None, request_id: str, hidden: re.Pattern | None = None,
                 deadline: float | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.compiler = compiler
        self.prompt_ids = prompt_ids
        self.params = params
        self.plan = plan
        self.request_id = request_id
        self.hidden = hidden  # chat: special-token text to drop, tool calls parsed; None: raw text (/v1/completions)
        self.deadline = deadline  # time.monotonic() by which the engine ends the request (RequestTimeoutError)
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
        parsers = [ToolCallStreamParser() if self.hidden is not None else None for _ in range(self.params.n)]
        ids: list[list[int]] = [[] for _ in range(self.params.n)]
        async with aclosing(self._it) as it:
            d = self._first
            while d is not None:
                self.prompt_tokens, self.cached_tokens = d.prompt_tokens, d.cached_prompt_tokens
                self.completion_tokens[d.index] = d.completion_tokens
                ids[d.index].extend(d.token_ids)
                p = parsers[d.index]
                if d.logprobs:
                    yield LogprobEvent(d.index, d.logprobs)
                deltas = [{"content": d.text}] if p is None else p.feed(self.hidden.sub("", d.text))
                if d.finished and p is not None:
                    deltas += self._drop_cut_headers(p.finish(), p)
                for ev in self._parsed(d.index, deltas):
                    yield ev
                if d.finished:
                    yield self._finish(d, p, ids[d.index])
                d = await anext(it, None)

    @staticmethod
    def _drop_cut_headers(deltas: list[dict], parser: ToolCallStreamParser) -> list[dict]:
        """A call cut off before its arguments began is only announced by finish(): never announce it."""
        broken = {i for i, c in enumerate(parser.calls) if c.error is not None}
        return [x for x in deltas if not any(tc.get("id") is not None and tc["index"] in broken
                                             for tc in x.get("tool_calls") or ())]

    def _parsed(self, index: int, deltas: list[dict]):
        calls_allowed = self.plan is not None and self.plan.mode != "none"  # else no call can ever be valid
        for delta in deltas:
            if delta.get("content"):
                yield TextEvent(index, delta["content"])
            for tc in (delta.get("tool_calls") or ()) if calls_allowed else ():
                fn = tc.get("function") or {}
                yield ToolEvent(index, tc["index"], tc.get("id"), fn.get("name"), fn.get("arguments") or "")

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
    samples = [Sample() for _ in range(gen.params.n)]
    async for ev in gen.events():
        s = samples[ev.index]
        if isinstance(ev, TextEvent):
            s.text += ev.text
        elif isinstance(ev, LogprobEvent):
            s.logprobs.extend(ev.logprobs)
        elif isinstance(ev, FinishEvent):
            s.finish, s.calls = ev, ev.calls
    return samples


def arguments_object(arguments: str) -> dict:
    value = json.loads(arguments)
    return value if isinstance(value, dict) else {"value": value}
