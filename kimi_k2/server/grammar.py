"""Constrained decoding for tool calls and JSON output, compiled by llguidance over the model's own tokenizer.

The grammar spells out the K2 tool-call section (MoonshotAI/Kimi-K2 docs/tool_call_guidance.md):

    <|tool_calls_section_begin|> (<|tool_call_begin|> functions.{name}:{idx} <|tool_call_argument_begin|> {json}
    <|tool_call_end|>)+ <|tool_calls_section_end|>

with `idx` the conversation-wide running call counter and `{json}` valid against that tool's schema. Free text
before the section excludes special tokens, so `auto` mode can only produce declared tools with valid arguments.

With reasoning on (K2-Thinking, `--reasoning-parser kimi_k2`) every grammar starts with the reasoning span the model
writes first, `<think> text </think>` then the answer as above, or `<think> text` straight into the tool-call section
(which ends the reasoning implicitly, as the reasoning parser reads it).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import llguidance
import numpy as np
import torch

from kimi_k2.server.json_schema import unproductive_ref

MAX_CALLS = 16  # tool calls per turn the grammar allows
# compact-but-standard JSON (json.dumps defaults); no free whitespace, so a model cannot loop on blanks
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

ToolMode = Literal["none", "auto", "required"]


@dataclass
class ToolPlan:
    tools: dict[str, dict]  # declared name -> JSON schema of the arguments
    mode: ToolMode = "auto"
    only: str | None = None  # forced (named) tool
    parallel: bool = True
    first_idx: int = 0  # id of the first new call is functions.{name}:{first_idx}
    validators: dict[str, llguidance.LLMatcher] = field(default_factory=dict)  # name -> compiled argument schema


def _json(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def lark_grammar(plan: ToolPlan | None, text_schema: dict | None, reasoning: bool = False) -> str | None:
    """Lark source for llguidance, or None when decoding is unconstrained."""
    calls = plan is not None and plan.mode != "none" and bool(plan.tools)
    if plan is None and text_schema is None:
        return None
    rules = ["THINK: /(?s:.*)/"] if reasoning else []
    text = "json_text" if text_schema is not None else "TEXT"
    if text_schema is not None:
        rules.append(f"json_text: {_json(text_schema)}")
    else:
        rules.append("TEXT: /(?s:.*)/")
    if not calls:  # tool_choice "none": text (or JSON), never a tool-call section
        return "\n".join([f"start: {_think(text, None, reasoning)}", *rules])
    names = [plan.only] if plan.only else list(plan.tools)
    n = 1 if plan.only or not plan.parallel else MAX_CALLS
    for k, name in enumerate(names):
        rules.append(f"args_{k}: {_json(plan.tools[name])}")
    for i in range(n):
        alts = " | ".join(f'"functions.{name}:{plan.first_idx + i}" <|tool_call_argument_begin|> args_{k}'
                          for k, name in enumerate(names))
        rules.append(f"call_{i}: <|tool_call_begin|> ({alts}) <|tool_call_end|>")
    chain = ""
    for i in reversed(range(1, n)):
        chain = f" (call_{i}{chain})?"
    rules.append(f"section: <|tool_calls_section_begin|> call_0{chain} <|tool_calls_section_end|>")
    if plan.mode == "required":
        answer = "section"
    elif text_schema is not None:
        answer = f"({text} | section)"
    else:
        answer = f"{text} section?"
    return "\n".join([f"start: {_think(answer, 'section', reasoning)}", *rules])


def _think(answer: str, section: str | None, reasoning: bool) -> str:
    """The start rule: `answer`, after the reasoning span when reasoning is on."""
    if not reasoning:
        return answer
    implicit = f" | {section}" if section else ""
    return f"<think> THINK (</think> {answer}{implicit})"


class GuidedDecoding:
    """TokenConstraint over an llguidance matcher. A matcher error (e.g. a parser limit hit) raises: the engine then
    fails this request alone, instead of returning output the grammar did not finish."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.m = matcher
        self.vocab_size = vocab_size

    def _check(self) -> None:
        if self.m.is_error():
            raise RuntimeError(f"grammar error: {self.m.get_error().splitlines()[0]}")

    def allowed(self) -> torch.Tensor | None:
        bits = np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8)
        self._check()
        mask = np.unpackbits(bits, bitorder="little").astype(bool)
        out = np.zeros(self.vocab_size, dtype=bool)
        k = min(self.vocab_size, mask.size)
        out[:k] = mask[:k]
        return torch.from_numpy(out)

    def advance(self, token_id: int) -> None:
        self.m.consume_token(token_id)
        self._check()

    def is_finished(self) -> bool:
        return self.m.is_stopped()


class GrammarCompiler:
    """Compiles grammars once per text (LRU) and hands out fresh matchers (one per sample). Used from the request
    preparation threads and the engine thread: the cache is guarded by a lock, compilation runs outside it (and
    outside the GIL), and a constraint keeps its compiled matcher, so the engine thread never compiles."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 64):
        self.vocab_size = vocab_size
        n = tokenizer.n_vocab
        specials = set(tokenizer.special_tokens.values())

        class _Bridge:  # what llguidance.TokenizerWrapper reads
            eos_token_id = tokenizer.stop_token_ids[0]
            bos_token_id = None
            tokens = [tokenizer.id_to_token_bytes(i) for i in range(n)]
            special_token_ids = sorted(specials)

            def __call__(self, s: bytes | str) -> list[int]:
                text = s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s
                return tokenizer.encode(text, allow_special=False)

        self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bridge()), n_vocab=n,
                                          eos_token=list(tokenizer.stop_token_ids))
        self.cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()

    def compiled(self, lark: str) -> llguidance.LLMatcher:
        """The compiled (never advanced) matcher of `lark`; ValueError naming the problem when the grammar (a tool
        or response schema) is invalid."""
        with self.lock:
            m = self.cache.get(lark)
            if m is not None:
                self.cache.move_to_end(lark)
                return m
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        err = llguidance.LLMatcher.validate_grammar(grammar, self.tok)
        if err and not err.startswith("WARNING"):
            raise ValueError(err.splitlines()[0])
        m = llguidance.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error().splitlines()[0])
        with self.lock:
            self.cache[lark] = m
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return m

    def constraint(self, lark: str | None) -> Callable[[], GuidedDecoding] | None:
        if lark is None:
            return None
        m = self.compiled(lark)  # compile now: bad schemas fail the request before any work
        return lambda: GuidedDecoding(m.deep_copy(), self.vocab_size)

    def check_schema(self, schema: object, what: str) -> llguidance.LLMatcher:
        """The compiled schema (for `accepts`); ValueError naming `what` when `schema` is not a JSON schema
        llguidance can enforce, or has no finite value (every value must contain another one: json_schema.py)."""
        if not isinstance(schema, dict):
            raise ValueError(f"{what} must be a JSON schema object")
        try:
            m = self.compiled(f"start: {_json(schema)}")
        except ValueError as e:
            raise ValueError(f"{what} is not a supported JSON schema: {e}") from None
        ref = unproductive_ref(schema)
        if ref is not None:
            where = "the schema itself" if ref == "#" else f"'$ref': {ref!r}"
            raise ValueError(f"{what} cannot be satisfied by any finite JSON value: through {where}, every value "
                             "must contain another value of the same schema (a recursion with no way out)")
        return m

    def validates(self, schema: dict, text: str) -> bool:
        """True when `text` is JSON valid against `schema` (the same automaton the constraint uses)."""
        return self.accepts(self.compiled(f"start: {_json(schema)}"), text)

    def accepts(self, compiled: llguidance.LLMatcher, text: str) -> bool:
        try:
            value = json.loads(text)
        except ValueError:
            return False
        m = compiled.deep_copy()
        ids = self.tok.tokenize_str(json.dumps(value, ensure_ascii=False))
        return m.consume_tokens(ids) and m.is_accepting()
