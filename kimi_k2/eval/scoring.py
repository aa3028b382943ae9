"""Scoring one user turn of an episode: tool-call accuracy and whether the final answer is right.

Per turn:
- tool_name: the multiset of called tool names equals the expected one (for a turn that needs no tool: no calls);
- args_valid: per call, the arguments are a JSON object that satisfies the tool's schema;
- args_correct: the multiset of (name, arguments) equals the expected one, after filling schema defaults and
  normalising values (numbers within 1e-6 relative, strings case- and whitespace-insensitive);
- answer_ok: the final answer has every expected number (within 0.01) and phrase (whole words), matches the
  exact-match target, and for a refusal has a refusal phrase and no tool call;
- success: args_correct and answer_ok.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass

from kimi_k2.eval import schema as js
from kimi_k2.eval.tools import TOOLS

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_REFUSAL = re.compile(r"\b(can't|cannot|can not|unable|not able|don't have|do not have|no tool|not possible)\b")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def numbers(text: str) -> list[float]:
    return [float(m.replace(",", "")) for m in _NUMBER.findall(text)]


def has_number(text: str, x: float, tol: float = 0.01) -> bool:
    return any(abs(y - x) <= tol + 1e-9 * abs(x) for y in numbers(text))


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style answer normalisation)."""
    text = text.lower().replace("\u2019", "'")
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, expected: str) -> bool:
    """A numeric target must equal the answer's last number; a text target must be the answer's last words."""
    try:
        target = float(expected)
    except ValueError:
        a, e = normalize(answer), normalize(expected)
        return bool(e) and (a == e or a.endswith(" " + e))
    found = numbers(answer)
    return bool(found) and abs(found[-1] - target) <= 1e-9 * max(1.0, abs(target))


def answer_ok(answer: str, expect: dict, n_calls: int) -> bool:
    text = answer.replace("\u2019", "'")
    ok = all(has_number(text, x) for x in expect.get("numbers", []))
    ok &= all(f" {normalize(s)} " in f" {normalize(text)} " for s in expect.get("contains", []))
    if expect.get("exact") is not None:
        ok &= exact_match(text, expect["exact"])
    if expect.get("refusal"):
        ok &= n_calls == 0 and bool(_REFUSAL.search(text.lower()))
    return ok


def parse_arguments(name: str, arguments: str, offered: set[str]) -> dict | None:
    """The call's arguments as a dict when the tool is offered and they are valid for its schema, else None."""
    if name not in offered or name not in TOOLS:
        return None
    try:
        args = json.loads(arguments)
    except (json.JSONDecodeError, TypeError):
        return None
    return args if isinstance(args, dict) and not js.errors(args, TOOLS[name].parameters) else None


def _canon(value):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        try:
            return float(f"{float(value):.6g}")
        except OverflowError:  # an integer beyond float range (models do write those): compare it exactly
            return str(value)
    if isinstance(value, str):
        return "".join(value.casefold().split())
    if isinstance(value, list):
        return [_canon(v) for v in value]
    return {k: _canon(v) for k, v in sorted(value.items())}


def call_key(name: str, args: dict) -> str:
    return name + json.dumps(_canon(js.with_defaults(args, TOOLS[name].parameters)), sort_keys=True)


@dataclass
class TurnScore:
    tool_name: bool
    calls_made: int
    calls_valid: int
    args_correct: bool
    answer_ok: bool

    @property
    def success(self) -> bool:
        return self.args_correct and self.answer_ok


def score_turn(made: list[tuple[str, str]], answer: str, expected_calls: list[dict], expect: dict,
               offered: set[str]) -> TurnScore:
    """`made`: (name, arguments JSON text) of every call in the turn; `expected_calls`: [{name, arguments}]."""
    parsed = [parse_arguments(n, a, offered) for n, a in made]
    want = Counter(call_key(c["name"], c["arguments"]) for c in expected_calls)
    got = Counter(call_key(n, p) if p is not None else f"invalid:{n}" for (n, _), p in zip(made, parsed, strict=True))
    return TurnScore(tool_name=Counter(n for n, _ in made) == Counter(c["name"] for c in expected_calls),
                     calls_made=len(made), calls_valid=sum(p is not None for p in parsed),
                     args_correct=got == want, answer_ok=answer_ok(answer, expect, len(made)))
