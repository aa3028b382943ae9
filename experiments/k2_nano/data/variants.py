"""Three variants of the invented-tool episodes (kimi_k2/data/invented.py), tried on the nano model in experiment 4 of
experiments/README.md and not shipped (`--sessions`, `--cased`, `--freeform` of experiments/k2_nano/synth.py):
- a session (`session_episode`) declares 3-4 invented tools once, with at most one distractor, then asks for each of
  them in a turn of its own, in random order, sometimes with a refusal among them;
- a cased episode (`VariantGen(cased=True)`) writes its topic words Capitalised or in Title Case in half the tool
  descriptions and conversion units, and opens 30% of its requests with the topic word ("Celsius" in a description,
  "celsius" in the request);
- a free-form episode (`VariantGen(freeform=True)`) describes its lookup tools in free sentences instead of the six
  templates, the topic word anywhere among other words.
With none of them an episode is exactly `invented.invented_episode`'s, draw for draw.
"""

from __future__ import annotations

import random

from kimi_k2.data.invented import (
    ASKS,
    DESCRIPTIONS,
    OPENERS,
    REAL_UNITS,
    SUBJECTS,
    Draws,
    InventedGen,
    InventedTool,
    add_distractors,
    convert,
    numeric,
    refusal,
    single,
    word,
)
from kimi_k2.eval.scenarios import Episode, train_episode

LEADING_ASKS = [a for a in ASKS if a.startswith("{thing}")]  # the topic word opens the request, capitalised
_QUALIFIERS = ["Daily", "Current", "Live", "Estimated", "Historical", "Simulated", "Official", "Approximate",
               "Average", "Latest", "Weekly", "Projected", "Measured", "Typical", "Peak", "Hourly"]
_SETTINGS = ["for a {noun}", "of the given {noun}", "for one {noun} at a time", "for any {noun} you name",
             "across a {noun}", "near a {noun}", "by {noun}", "at the requested {noun}"]
_AFTERWORDS = ["", "", " (simulated data).", " in {unit}.", ", updated every hour.", ". Results are approximate.",
               ", from the {word} index.", ", rounded to whole {unit}.", ". Uses the {word} method.",
               " for the next few days.", ", as reported by the {word} service."]


class VariantGen(InventedGen):
    """The invented-tool generator with its topic words in varied case (`cased`) and free-form descriptions
    (`freeform`)."""

    def __init__(self, rng: random.Random, cased: bool = False, freeform: bool = False):
        super().__init__(rng)
        self.cased, self.freeform = cased, freeform

    def recase(self, text: str) -> str:
        """In a cased episode, half the time `text` Capitalised or in Title Case."""
        if not self.cased or self.rng.random() < 0.5:
            return text
        return text.capitalize() if self.rng.random() < 0.5 else text.title()

    def describe(self, thing: str, noun: str) -> str:
        template = self.rng.choice(DESCRIPTIONS)
        desc = template.format(thing=self.recase(thing), Thing=thing.capitalize(), noun=noun, word=word(self.rng))
        return self.freeform_description(thing, noun) if self.freeform else desc

    def freeform_description(self, thing: str, noun: str) -> str:
        """A description as real APIs write them: the topic word anywhere in a longer sentence among other words, in
        any case ("Estimated Tide Height near a place, updated every hour.")."""
        rng, t = self.rng, self.recase(thing)
        setting = rng.choice(_SETTINGS).format(noun=noun)
        head = rng.choice([f"{rng.choice(_QUALIFIERS)} {t} {setting}",
                           f"Returns the {rng.choice(_QUALIFIERS).lower()} {t} {setting}",
                           f"Look up the {t} {setting}", f"{t.capitalize()} {setting}",
                           f"Gives the {t} and its {word(rng)} {setting}", f"Tells you the {t} {setting}"])
        tail = rng.choice(_AFTERWORDS).format(unit=rng.choice(REAL_UNITS), word=word(rng))
        return head + (tail if tail.endswith(".") else tail + ".")

    def describe_conversion(self, quantity: str, units: list[str]) -> str:
        return super().describe_conversion(quantity, [self.recase(u) for u in units])

    def request(self, tool: InventedTool, v: str, extra: str) -> str:
        if not self.cased:
            return super().request(tool, v, extra)
        thing = tool.alias if tool.alias and self.rng.random() < 0.5 else tool.thing
        leading = self.rng.random() < 0.3
        core = self.pick(LEADING_ASKS if leading else ASKS).format(thing=thing, v=v, extra=extra,
                                                                   noun=SUBJECTS[tool.subject].noun)
        return self.sentence(("" if leading else self.rng.choice(OPENERS)) + core, v)


def variant_episode(seed: int, index: int, pieces: tuple[str, ...] = (), cased: bool = False,
                    freeform: bool = False) -> Episode:
    """`invented.invented_episode(seed, index, pieces)` with the variants asked for (the same draws without them)."""
    return VariantGen(Draws(f"{seed}/broad/{index}", pieces), cased, freeform).episode()


def session_episode(seed: int, index: int, pieces: tuple[str, ...] = (), cased: bool = False,
                    freeform: bool = False) -> Episode:
    """Session episode `index` of `seed`: 3-4 tools declared once (and at most one distractor), then one user turn for
    each of them in random order, sometimes with a refusal among them."""
    rng = Draws(f"{seed}/broad-session/{index}", pieces)
    g = VariantGen(rng, cased, freeform)
    tools, turns = [], []
    n = rng.randint(3, 4)
    while len(tools) < n:
        (tool,), (turn,) = rng.choices([single, convert, numeric], [40, 12, 11])[0](g)
        if tool.name not in {t.name for t in tools}:  # two conversions of one quantity would share a name
            tools.append(tool)
            turns.append(turn)
    if rng.random() < 0.3:
        turns += refusal(g)[1]
    rng.shuffle(turns)
    specs = add_distractors(rng, [t.spec for t in tools], rng.randint(0, 1), 0.2, lambda: g.tool().spec)
    for t in turns:
        t.templates = list(g.templates)
    return train_episode("broad_session", specs, turns)
