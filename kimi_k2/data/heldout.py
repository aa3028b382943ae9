"""The held-out property: nothing a benchmark task uses (kimi_k2.eval) is ever in the training data.

The benchmarks are held-out reference episodes: their tools, argument values and user phrasings come from the held-out
halves of kimi_k2/eval/{tools,world,phrasings}.py. `check_heldout` compares generated train and held-out episodes on
exactly those (and on whole user messages); `kimi-k2 data synth` runs it on every write. Episodes over invented tools
draw their words away from `HELDOUT_WORDS`, so that the check holds for them too; `leaked_words` looks for held-out
values anywhere in the train text, in tool descriptions and answers too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from kimi_k2.eval import world
from kimi_k2.eval.scenarios import Episode, fmt

# held-out string values (cities, shop items and their words, element symbols and names), lower case
HELDOUT_WORDS = frozenset({c.name.lower() for c in world.HELDOUT_CITIES} | set(world.HELDOUT_CATALOG)
                          | {w for item in world.HELDOUT_CATALOG for w in item.split()}
                          | {e.symbol.lower() for e in world.HELDOUT_ELEMENTS}
                          | {e.name for e in world.HELDOUT_ELEMENTS})
_LONG_HELDOUT_WORDS = [h for h in HELDOUT_WORDS if len(h) >= 4]


def is_heldout_word(w: str) -> bool:
    """`w` (any case) is a held-out value or a piece of a held-out value of 4+ letters ("lim" of "lima")."""
    w = w.lower()
    return w in HELDOUT_WORDS or any(w in h for h in _LONG_HELDOUT_WORDS)


def _leaves(x) -> Iterator:
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, list):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def _key(v) -> str:
    """Numbers compare by value (7 == 7.0), strings case-insensitively."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return fmt(v)
    return json.dumps(v.lower() if isinstance(v, str) else v)


def footprint(ep: Episode) -> dict[str, set]:
    """What the held-out property compares: tool names, free argument values, user phrasings and messages.
    Enum values are not 'values' (they are part of a tool's schema)."""
    values = set()
    for t in ep.turns:
        for r in t.rounds:
            for c in r:
                props = ep.parameters(c.name)["properties"]
                values |= {_key(x) for k, v in c.arguments.items() if "enum" not in props[k] for x in _leaves(v)}
    return {"tools": {c.name for t in ep.turns for r in t.rounds for c in r} | set(ep.tools),
            "values": values,
            "templates": {x for t in ep.turns for x in t.templates},
            "messages": {t.user for t in ep.turns}}


def check_heldout(train: list[Episode], heldout: list[Episode]) -> None:
    """Raise ValueError naming what a held-out episode shares with training (tools, values, phrasings, messages)."""
    seen: dict[str, set] = {"tools": set(), "values": set(), "templates": set(), "messages": set()}
    for ep in train:
        for k, v in footprint(ep).items():
            seen[k] |= v
    for ep in heldout:
        for k, v in footprint(ep).items():
            shared = v & seen[k]
            if shared:
                raise ValueError(f"held-out {ep.kind} episode shares {k} with training: {sorted(shared)[:5]}")


def leaked_words(train: list[Episode], heldout: list[Episode]) -> list[str]:
    """The held-out string values of 4+ letters (cities, items, element names...) of the `heldout` episodes that occur
    as whole words anywhere in the `train` episodes' conversations, lower-cased and sorted; [] when none does."""
    text = " ".join(json.dumps(e.conversation()) for e in train).lower()
    words = {json.loads(v) for e in heldout for v in footprint(e)["values"] if v.startswith('"')}
    words = {w for w in words if len(w) >= 4}
    if not words:
        return []
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b")
    return sorted(set(pattern.findall(text)))
