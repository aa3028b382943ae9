"""Short-answer episodes (`--status F` of experiments/k2_nano/synth.py): tools whose whole result is one word or phrase
(`{"weather": "Sunny"}`), answered by quoting it, and self-introductions asked in more ways than the reference
episodes' phrasing pools have. Written for the nano model's second SFT pass, whose first pass answered a bare
`{"weather": "Sunny"}` by calling the tool again (experiments/README.md); the shipped passes were trained on it.

Tool names, argument values and phrasings stay away from the held-out split as generic.py's do
(`kimi_k2.data.heldout.check_heldout` holds for train sets that mix these in).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from experiments.k2_nano.data.generic import SUBJECTS
from kimi_k2.eval.scenarios import IDENTITY, Call, Episode, Expect, Turn, train_episode
from kimi_k2.eval.schema import object_schema
from kimi_k2.eval.tools import TOOLS, tools_of


@dataclass(frozen=True)
class Status:
    thing: str
    key: str
    values: tuple[str, ...]
    subject: str


STATUSES = [Status(*s) for s in [
    ("weather", "weather", ("Sunny", "Cloudy", "Rainy", "Windy", "Foggy", "Snowy", "Stormy", "Clear"), "place"),
    ("road conditions", "conditions", ("clear", "icy", "flooded", "busy", "closed"), "place"),
    ("opening status", "status", ("open", "closed", "opening soon"), "place"),
    ("air quality", "air_quality", ("good", "fair", "poor", "very poor"), "place"),
    ("availability", "availability", ("in stock", "sold out", "backordered"), "item"),
    ("delivery status", "status", ("shipped", "out for delivery", "delivered", "delayed"), "code"),
    ("flight status", "status", ("on time", "delayed", "boarding", "cancelled"), "code"),
    ("membership level", "level", ("bronze", "silver", "gold", "platinum"), "person"),
]]
_VERBS = ["check", "lookup", "fetch", "current", "read"]
_DESCRIPTIONS = ["Retrieve the current {thing} for a {noun}. Call this when the user asks about the {thing}.",
                 "Current {thing} of a {noun}.", "Look up the {thing} of one {noun} (invented data)."]
_ASK = ["What's the {thing} like for {v} today?", "How is the {thing} for {v}? Use the tool to check.",
        "Check the {thing} of {v}, please.", "Can you tell me the {thing} for {v} right now?",
        "I'd like to know the {thing} of {v}."]
_ANSWER = ["The {thing} for {v} is {x}.", "Right now the {thing} of {v} is {x}.", "{V}: {x}.",
           "According to the tool, the {thing} for {v} is {x}."]
_FOLLOW = ["And {v}?", "How about {v}?"]
# self-introduction requests beyond the reference episodes' pools (none of them a held-out phrasing)
INTRODUCE = ["Give a brief introduction of yourself.", "Please introduce yourself briefly.",
             "Could you give me a quick self-introduction?", "Say a few words about yourself.",
             "Describe yourself in a sentence.", "Before we start, who am I talking to?", "hi", "Hello!",
             "Good morning! Who is this?", "Who created you, and what can you do?", "What is your name?",
             "Introduce yourself in one line, please.", "Let's begin with a short self-introduction from you."]
KINDS = {"status_single": 60, "status_follow_up": 20, "identity_more": 20}


def _tool(rng: random.Random, status: Status) -> dict:
    thing = status.thing.replace(" ", "_")
    while (name := rng.choice([f"{rng.choice(_VERBS)}_{thing}", f"{thing}_now", f"{status.subject}_{thing}"])) in TOOLS:
        pass
    arg = rng.choice(SUBJECTS[status.subject].arg_names)
    prop = {"type": "string"} | ({"description": f"Name of the {arg}"} if rng.random() < 0.5 else {})
    desc = rng.choice(_DESCRIPTIONS).format(thing=status.thing, noun=SUBJECTS[status.subject].noun)
    return {"type": "function",
            "function": {"name": name, "description": desc, "parameters": object_schema([arg], **{arg: prop})}}


def _ask(rng: random.Random, templates: list[str], spec: dict, status: Status, prompts: list[str]) -> Turn:
    """One turn: a request for the status of a new subject, the call, and an answer quoting the one-word result."""
    v = SUBJECTS[status.subject].value(rng)
    arg = next(iter(spec["function"]["parameters"]["properties"]))
    x = rng.choice(status.values)
    template = rng.choice(templates)
    user = template.format(thing=status.thing, v=v)
    call = Call(spec["function"]["name"], {arg: v}, {status.key: x})
    answer = rng.choice(_ANSWER).format(thing=status.thing, v=v, V=v[0].upper() + v[1:], x=x)
    prompts.append(template)
    return Turn(user, [[call]], answer, Expect(contains=[x]), [])


def status_episode(seed: int, index: int) -> Episode:
    """Status episode `index` of `seed`: a one-word-result tool call (maybe with a follow-up turn), or an introduction;
    0-2 distractors (train tools)."""
    rng = random.Random(f"{seed}/status/{index}")
    kind = rng.choices(list(KINDS), list(KINDS.values()))[0]
    specs: list[dict] = []
    templates: list[str] = []
    if kind == "identity_more":
        user = rng.choice(INTRODUCE)
        templates.append(user)
        turns = [Turn(user, [], rng.choice(IDENTITY), Expect(contains=["Kimi", "Moonshot AI"]), [])]
    else:
        status = rng.choice(STATUSES)
        specs.append(_tool(rng, status))
        turns = [_ask(rng, _ASK, specs[0], status, templates)]
        if kind == "status_follow_up":
            turns.append(_ask(rng, _FOLLOW, specs[0], status, templates))
    names = {s["function"]["name"] for s in specs}
    for t in rng.sample(tools_of("train"), rng.randint(0, 2)):
        if t.name not in names:
            specs.append(t.spec())
    rng.shuffle(specs)
    for t in turns:
        t.templates = list(templates)
    return train_episode(kind, specs, turns)
