"""Conversations over tools invented for each conversation, open vocabulary: topic words, tool and argument names,
argument values and results are all made up per episode.

The executable tools (kimi_k2/eval/tools.py) are few, and a small model trained only on them memorises their names and
values instead of learning the skill. Here every episode invents its tools, so the skill is all there is to learn:
- pick the declared tool whose name, description (an alias the request may use instead) or enum values share words
  with the request, among 1-4 distractors; refuse when none does;
- copy argument values out of the request: names, codes, dates, numbers, and enum words into the right arguments;
- answer by quoting the result's numbers with their unit.
Words come from a syllable generator over the whole alphabet and, given a tokenizer (`word_pieces`), half the time from
its word pieces: a token that is never a training target loses its output row to the "never emit" direction during
fine-tuning, and then no skill can copy it (experiments/README.md, experiment 3), so every piece should be a copy
target somewhere. Requests are an opener, one of 24 sentence patterns and a closer. Results are a hash of the call.

Nothing here is held out: no word is a held-out value (`heldout.is_heldout_word`) or a held-out tool's topic
(`HELDOUT_TOPICS`), numeric arguments are integers >= 7 or non-integers >= 401 (held-out ones are integers <= 6 or
non-integers below 401), dates are in 2025-2026 (held-out: 2027) and no pattern is a held-out phrasing, so
`heldout.check_heldout` holds for train sets that mix these episodes in.

Kinds (the `kind` of a conversation): broad_single, broad_parallel, broad_follow_up, broad_refusal, broad_convert,
broad_numeric; episode i of a seed draws from `random.Random(f"{seed}/broad/{i}")` ("broad": the name these episodes
had when the shipped data sets were made).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable
from dataclasses import dataclass

from kimi_k2.data.heldout import HELDOUT_WORDS, is_heldout_word
from kimi_k2.eval.scenarios import REFUSAL, Call, Episode, Expect, Turn, fmt, train_episode
from kimi_k2.eval.schema import object_schema
from kimi_k2.eval.tools import TOOLS, stable_hash, tools_of
from kimi_k2.tokenizer import Tokenizer

# the topics of the held-out tools, never a whole invented word (a piece of a longer one is fine)
HELDOUT_TOPICS = {w for t in TOOLS.values() if t.split == "heldout" for w in t.name.split("_")} - {
    "get", "add", "to", "view", "lookup", "convert", "city", "split"} | {"celsius", "fahrenheit", "kelvin"}

# ---- words ------------------------------------------------------------------------------------------------------

_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "v", "w", "y", "z",
           "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "kn", "ph", "pl", "pr", "sc", "sh", "sk",
           "sl", "sm", "sn", "sp", "st", "sw", "th", "tr", "wh", "wr", ""]
_NUCLEI = ["a", "e", "i", "o", "u", "y", "ai", "au", "ea", "ee", "ei", "ie", "io", "oa", "oo", "ou", "ua"]
_CODAS = ["", "", "", "b", "ck", "d", "ff", "g", "k", "l", "ll", "m", "n", "nd", "ng", "nk", "nt", "p", "r", "rd",
          "rk", "rn", "s", "sh", "ss", "st", "t", "th", "tt", "x", "z"]
# real words for topics and units, none of them a held-out tool's topic
_REAL_THINGS = ["humidity", "snow depth", "tide height", "noise level", "battery level", "queue length",
                "water level", "ticket price", "parking fee", "crowd size", "download speed", "latency", "calories",
                "sugar content", "battery life", "floor area", "salary", "tax rate", "interest rate", "pollen count",
                "sunshine hours", "uv index", "traffic delay", "wait time", "fuel price", "toll", "fee", "score",
                "budget", "revenue", "headcount", "bandwidth", "storage used", "error rate", "uptime", "load",
                "voltage", "pressure", "altitude", "depth", "volume", "mass", "length", "width", "speed", "density",
                "yield", "cost", "discount", "deposit", "commission", "ranking", "turnout", "attendance", "capacity"]
REAL_UNITS = ["percent", "points", "units", "dollars", "euros", "grams", "litres", "metres", "seconds", "minutes",
              "hours", "watts", "volts", "bytes", "megabytes", "pascals", "knots", "acres", "hectares", "pounds",
              "ounces", "pints", "gallons", "joules", "newtons", "lumens", "tons"]
_REAL_NOUNS = ["kettle", "pillow", "tablet", "router", "bicycle", "camera", "guitar", "sofa",
               "printer", "speaker", "stapler", "wallet", "umbrella", "charger", "blender", "toaster", "monitor",
               "keyboard", "tent", "compass", "pencil", "basketball", "skateboard", "microwave", "thermos", "poster"]
_REAL_NOUNS = [w for w in _REAL_NOUNS if w not in HELDOUT_WORDS]
_QUANTITIES = ["length", "weight", "volume", "area", "speed", "energy", "pressure", "power", "data size"]
_VERBS = ["get", "lookup", "fetch", "find", "check", "query", "read", "compute", "estimate", "show", "list", "search"]


class Draws(random.Random):
    """The random source of one episode, with the word pieces its invented words may be made of (none: syllables)."""

    def __init__(self, seed: str, pieces: tuple[str, ...] = ()):
        super().__init__(seed)
        self.pieces = pieces


def word_pieces(tokenizer: Tokenizer) -> tuple[str, ...]:
    """The tokenizer's word tokens of two or more ASCII letters, lowercased, without their leading space."""
    pieces = set()
    for i in range(tokenizer.num_base_tokens):
        text = tokenizer.id_to_token_bytes(i).decode("utf-8", errors="replace").removeprefix(" ")
        if len(text) >= 2 and text.isascii() and text.isalpha():
            pieces.add(text.lower())
    return tuple(sorted(pieces))


def word(rng: random.Random, syllables: int | None = None) -> str:
    """A lowercase invented word, no held-out value nor held-out topic: 1-3 syllables, or with word pieces (`Draws`)
    half the time one or two of them."""
    pieces = rng.pieces if isinstance(rng, Draws) else ()
    while True:
        if pieces and rng.random() < 0.5:
            w = "".join(rng.choice(pieces) for _ in range(1 if syllables == 1 else rng.choice([1, 1, 2])))
            if {w, w.removesuffix("s")} & HELDOUT_TOPICS:
                continue
        else:
            n = syllables or rng.choice([1, 2, 2, 2, 2, 3])
            w = "".join(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS) for _ in range(n))
        if 3 <= len(w) <= 14 and not is_heldout_word(w):
            return w


def proper(rng: random.Random) -> str:
    """A place or person name: one or two capitalised invented words."""
    return " ".join(word(rng).capitalize() for _ in range(rng.choice([1, 1, 1, 2])))


def thing_name(rng: random.Random) -> str:
    """An object: an invented or real noun, often after an invented or real modifier."""
    noun = rng.choice(_REAL_NOUNS) if rng.random() < 0.4 else word(rng)
    return f"{word(rng)} {noun}" if rng.random() < 0.6 else noun


def code(rng: random.Random) -> str:
    while (c := "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(2, 5)))).lower() \
            in HELDOUT_WORDS:
        pass
    return c + (f"-{rng.randint(10, 9999)}" if rng.random() < 0.4 else "")


def date(rng: random.Random) -> str:
    """A date in 2025-2026 (held-out dates are in 2027)."""
    return (dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(730))).isoformat()


def amount(rng: random.Random) -> int | float:
    """A numeric argument: an integer >= 7 or a non-integer >= 401 (smaller ones are held out)."""
    if rng.random() < 0.6:
        return rng.choice([rng.randint(7, 60), rng.randint(7, 9999)])
    return round(rng.uniform(401, 99999), rng.choice([1, 2]))


@dataclass(frozen=True)
class Subject:
    """What a lookup tool is asked about: how a request names it, its argument names, a value generator."""

    noun: str
    arg_names: list[str]
    value: Callable[[random.Random], str]


SUBJECTS = {
    "place": Subject("place", ["city", "town", "place", "location", "region", "site"], proper),
    "person": Subject("person", ["name", "person", "user", "member", "customer"], proper),
    "object": Subject("item", ["item", "product", "object", "article", "thing"], thing_name),
    "code": Subject("code", ["code", "id", "ref", "ticker", "sku", "serial"], code),
    "date": Subject("date", ["date", "day", "on"], date),
}

# ---- tools ------------------------------------------------------------------------------------------------------


@dataclass
class InventedTool:
    spec: dict
    thing: str  # the topic a request asks about, as the name or description says it
    alias: str  # another word for it, only in the description ("" if none)
    key: str  # the result field
    unit: str
    decimals: int
    subject: str
    arg: str  # the subject's argument name
    count: str = ""  # an optional integer argument ("nights")
    option: str = ""  # an optional enum argument ("mode")
    choices: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]


def _snake(text: str) -> str:
    return text.replace(" ", "_").replace("-", "_")


def _topic(rng: random.Random) -> str:
    if rng.random() < 0.35:
        return rng.choice(_REAL_THINGS)
    return word(rng) if rng.random() < 0.7 else f"{word(rng)} {rng.choice(['level', 'rate', 'count', 'index'])}"


_SUFFIXES = {"level", "rate", "count", "index"}


def new_topic(rng: random.Random, taken: set[str]) -> str:
    """A topic sharing no word (but a generic suffix) with the topics in `taken`, so one request fits one tool."""
    while (set((thing := _topic(rng)).split()) - _SUFFIXES) & taken:
        pass
    taken |= set(thing.split()) - _SUFFIXES
    return thing


def after_number(unit: str) -> str:
    """How a unit follows a number in an answer: "12 mm", "12 dollars", but "12%"."""
    return f" {unit}" if unit and unit != "%" else unit


def add_distractors(rng: random.Random, specs: list[dict], n: int, p_train: float,
                    invent: Callable[[], dict]) -> list[dict]:
    """`specs` plus up to `n` distractors (each a train tool with probability `p_train`, else `invent()`; a name
    already declared is skipped), shuffled."""
    for _ in range(n):
        spec = rng.choice(tools_of("train")).spec() if rng.random() < p_train else invent()
        if spec["function"]["name"] not in {s["function"]["name"] for s in specs}:
            specs.append(spec)
    rng.shuffle(specs)
    return specs


# ---- requests and answers ------------------------------------------------------------------------------------------

DESCRIPTIONS = ["Get the {thing} of a {noun}.", "Returns the current {thing} for the given {noun}.",
                "{Thing} lookup by {noun} (invented data).", "Look up {thing} data for one {noun}.",
                "The {thing} of a {noun}, from the {word} service.", "Reports a {noun}'s {thing}."]
OPENERS = ["", "", "", "", "Hi! ", "Hey, ", "Quick question: ", "Hello. ", "Hi there, ", "OK, ", "So, ",
           "I have a question. ", "Excuse me, "]
ASKS = ["what is the {thing} of {v}{extra}?", "can you look up the {thing} for {v}{extra}?",
        "tell me the {thing} of {v}{extra}.", "I need the {thing} for {v}{extra}.", "{thing} of {v}{extra}?",
        "{thing} for {v}{extra}?", "please find the {thing} for {noun} {v}{extra}.",
        "check the {thing} for {v}{extra}",
        "what's {v}'s {thing}{extra}?", "give me the {thing} of {v}{extra}.", "{v}: {thing}{extra}?",
        "look up {thing} for {v}{extra}", "I'd like to know the {thing} of {v}{extra}.",
        "do you know the {thing} for {v}{extra}?", "find out the {thing} of {v}{extra}",
        "show me the {thing} for {v}{extra}.", "what {thing} does {v} have{extra}?",
        "any idea what the {thing} of {v} is{extra}?", "could you get me the {thing} for the {noun} {v}{extra}?",
        "report the {thing} for {v}{extra}.", "{v} - what is its {thing}{extra}?", "the {thing} at {v}{extra}?",
        "how about the {thing} for {v}{extra}?", "need {thing} info for {v}{extra}"]
_CLOSERS = ["", "", "", " Thanks!", " Please.", " Use the tool.", " Thank you."]
_EXTRA_COUNT = [" for {n} {count}", ", {n} {count}", " with {n} {count}", " ({n} {count})"]
_EXTRA_OPTION = [" in {o}", " by {o}", ", {o}", " ({o})", " using {o}"]
_ANSWERS = ["The {thing} of {v} is {x}{unit}.", "{V} has a {thing} of {x}{unit}.", "{Thing} for {v}: {x}{unit}.",
            "According to the tool, the {thing} of {v} is {x}{unit}.", "It is {x}{unit} for {v}.",
            "For {v}, the {thing} comes to {x}{unit}.", "{V}: {x}{unit}."]
_CONNECTORS = ["{a} Also, {b}", "{a} And another thing: {b}", "{a} Second, {b}", "{a} In addition, {b}",
               "{a} Oh, and {b}", "{a} Next, {b}", "Two questions. {a} {B}", "{a} Besides that, {b}"]
_FOLLOWS = ["And {v}?", "What about {v}?", "Same for {v}, please.", "Now {v}.", "And for {v}?", "How about {v}?"]
_REFUSE_VERBS = ["Book", "Order", "Send", "Cancel", "Delete", "Upload", "Water", "Paint", "Wash", "Feed", "Repair",
                 "Mail", "Charge", "Fold", "Clean", "Move", "Sell", "Lend", "Frame", "Polish", "Deliver", "Sign"]
_REFUSE_TAILS = ["", " tomorrow", " for me", " tonight", " this weekend", " right away", " next week"]


class InventedGen:
    """One episode's generator: its random source, the topics its tools took so far (distractors take others) and the
    templates its requests and answers used (the held-out check compares them)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.templates: list[str] = []
        self.taken: set[str] = set()

    def pick(self, templates: list[str]) -> str:
        t = self.rng.choice(templates)
        self.templates.append(t)
        return t

    def tool(self) -> InventedTool:
        """A lookup tool for a new topic of one subject, with maybe a count and an enum argument."""
        rng = self.rng
        thing = new_topic(rng, self.taken)
        alias = word(rng) if rng.random() < 0.25 else ""
        subject = rng.choice(list(SUBJECTS))
        noun, arg_names = SUBJECTS[subject].noun, SUBJECTS[subject].arg_names
        arg = rng.choice(arg_names) if rng.random() < 0.8 else f"{word(rng, 1)}_{rng.choice(arg_names)}"
        t, s = _snake(thing), "object" if subject == "object" else subject
        while (name := rng.choice([f"{rng.choice(_VERBS)}_{t}", t, f"{t}_lookup", f"{s}_{t}", f"{t}_by_{s}",
                                   f"{rng.choice(_VERBS)}_{s}_{t}",
                                   f"{rng.choice(_VERBS)}{t.title().replace('_', '')}"])) in TOOLS:
            pass
        desc = self.describe(thing, noun)
        if alias:
            desc += rng.choice([f" Also called {alias}.", f" ({alias})", f" Use it for {alias} questions."])
        props: dict[str, dict] = {arg: {"type": "string"}}
        if subject == "date":
            props[arg] |= {"pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "YYYY-MM-DD"}
        elif rng.random() < 0.3:
            props[arg]["description"] = f"the {noun}"
        names = [arg]
        count = option = ""
        choices: tuple[str, ...] = ()
        if rng.random() < 0.35:
            count = rng.choice(["nights", "people", "units", "weeks", "copies", "seats", "hours"]) \
                if rng.random() < 0.6 else word(rng) + "s"
            props[count] = {"type": "integer", "minimum": 1}
            names.append(count)
        if rng.random() < 0.35:
            option = rng.choice(["mode", "unit", "tier", "kind", "format", "currency"])
            choices = tuple(rng.sample(REAL_UNITS, 2) if option == "unit" else
                            [word(rng) for _ in range(rng.randint(2, 4))])
            props[option] = {"type": "string", "enum": list(dict.fromkeys(choices))}
            names.append(option)
        unit = rng.choice(REAL_UNITS) if rng.random() < 0.6 else (word(rng) + "s" if rng.random() < 0.5 else "")
        required = names[:1] + [n for n in names[1:] if rng.random() < 0.7]
        spec = {"type": "function", "function": {"name": name, "description": desc,
                                                 "parameters": object_schema(required, **props)}}
        key = _snake(thing) if rng.random() < 0.6 else rng.choice(["value", "result", "amount"])
        if key in {"unit", *names}:  # the result holds the arguments and the unit too
            key = "result"
        return InventedTool(spec, thing, alias, key, unit, rng.choice([0, 0, 1, 2]), subject, arg, count, option,
                            choices)

    def describe(self, thing: str, noun: str) -> str:
        """A lookup tool's description: one of `DESCRIPTIONS`."""
        template = self.rng.choice(DESCRIPTIONS)
        return template.format(thing=thing, Thing=thing.capitalize(), noun=noun, word=word(self.rng))

    def describe_conversion(self, quantity: str, units: list[str]) -> str:
        return f"Convert a {quantity} between {', '.join(units[:-1])} and {units[-1]}."

    def call(self, tool: InventedTool, v: str) -> tuple[Call, str]:
        """A call for subject `v` with the tool's optional arguments drawn, and the request's extra words for them."""
        args: dict = {tool.arg: v}
        extra = ""
        required = tool.spec["function"]["parameters"]["required"]
        if tool.count and (tool.count in required or self.rng.random() < 0.5):
            args[tool.count] = n = self.rng.randint(7, 40)
            extra += self.pick(_EXTRA_COUNT).format(n=n, count=tool.count)
        if tool.option and (tool.option in required or self.rng.random() < 0.5):
            args[tool.option] = o = self.rng.choice(tool.choices)
            extra += self.pick(_EXTRA_OPTION).format(o=o)
        h = stable_hash("broad", tool.name, *args.values()) % 1_000_003 / 1_000_003
        x = round(h * 10 ** self.rng.randint(1, 5), tool.decimals) if tool.decimals else int(h * 10 ** 5)
        return Call(tool.name, args, args | {tool.key: x} | ({"unit": tool.unit} if tool.unit else {})), extra

    def request(self, tool: InventedTool, v: str, extra: str) -> str:
        thing = tool.alias if tool.alias and self.rng.random() < 0.5 else tool.thing
        core = self.pick(ASKS).format(thing=thing, v=v, extra=extra, noun=SUBJECTS[tool.subject].noun)
        return self.sentence(self.rng.choice(OPENERS) + core, v)

    def sentence(self, text: str, v: str) -> str:
        """`text` capitalised (unless it opens with the value `v`, which keeps its case), maybe with a closer."""
        text = text if text.startswith(v) else text[0].upper() + text[1:]
        return text + self.rng.choice(_CLOSERS) if text[-1] in ".?!" else text + self.rng.choice(["", "."])

    def answer(self, tool: InventedTool, c: Call) -> str:
        v = str(c.arguments[tool.arg])
        return self.pick(_ANSWERS).format(thing=tool.thing, Thing=tool.thing.capitalize(), v=v, V=v[0].upper() + v[1:],
                                          x=fmt(c.result[tool.key]), unit=after_number(tool.unit))

    def single_turn(self, tool: InventedTool | None = None) -> tuple[InventedTool, Turn]:
        tool = tool or self.tool()
        c, extra = self.call(tool, SUBJECTS[tool.subject].value(self.rng))
        turn = Turn(self.request(tool, c.arguments[tool.arg], extra), [[c]], self.answer(tool, c),
                    Expect(numbers=[c.result[tool.key]]), [])
        return tool, turn

    def episode(self) -> Episode:
        """An episode of a kind drawn by `KINDS`' weights: its tools plus 1-4 distractors (invented tools of other
        topics, or train tools); a refusal declares 1-4 tools, none of them for the request."""
        kind = self.rng.choices(list(KINDS), [w for _, w in KINDS.values()])[0]
        tools, turns = KINDS[kind][0](self)
        specs = add_distractors(self.rng, [t.spec for t in tools], self.rng.randint(1, 4), 0.2,
                                lambda: self.tool().spec)
        for t in turns:
            t.templates = list(self.templates)
        return train_episode(kind, specs, turns)


# ---- episode kinds: (generator) -> (the tools to declare, the turns) ---------------------------------------------

Built = tuple[list[InventedTool], list[Turn]]


def single(g: InventedGen) -> Built:
    tool, turn = g.single_turn()
    return [tool], [turn]


def parallel(g: InventedGen) -> Built:
    """Two requests in one message, answered by two calls in one assistant message."""
    (t1, a), (t2, b) = g.single_turn(), g.single_turn()
    starts_with_value = any(b.user.startswith(str(v)) for c in b.rounds[0] for v in c.arguments.values())
    user = g.pick(_CONNECTORS).format(a=a.user, b=b.user if starts_with_value else b.user[0].lower() + b.user[1:],
                                      B=b.user)
    return [t1, t2], [Turn(user, [a.rounds[0] + b.rounds[0]], f"{a.answer} {b.answer}",
                           Expect(numbers=a.expect.numbers + b.expect.numbers), [])]


def follow_up(g: InventedGen) -> Built:
    """A second turn that names only a new subject ("And Spoass?"): the same tool with the first call's options."""
    tool, first = g.single_turn()
    c1 = first.rounds[0][0]
    v = SUBJECTS[tool.subject].value(g.rng)
    c2, _ = g.call(tool, v)
    c2 = Call(tool.name, c1.arguments | {tool.arg: v}, c2.result | c1.arguments | {tool.arg: v})
    second = Turn(g.pick(_FOLLOWS).format(v=v), [[c2]], g.answer(tool, c2), Expect(numbers=[c2.result[tool.key]]), [])
    return [tool], [first, second]


def refusal(g: InventedGen) -> Built:
    """An action no declared tool does, or a question about a topic none covers."""
    if g.rng.random() < 0.5:
        obj = f"my {thing_name(g.rng)}" if g.rng.random() < 0.5 else f"the {word(g.rng)} for {proper(g.rng)}"
        user = f"{g.rng.choice(_REFUSE_VERBS)} {obj}{g.rng.choice(_REFUSE_TAILS)}."
    else:
        user = g.single_turn()[1].user  # its tool is not declared; distractors take other topics
    return [], [Turn(user, [], REFUSAL, Expect(refusal=True), [])]


def convert(g: InventedGen) -> Built:
    """A conversion between enum units: the request names the value and both units, the call copies them."""
    quantity = word(g.rng) if g.rng.random() < 0.5 else g.rng.choice(_QUANTITIES)
    g.taken |= set(quantity.split())
    units = list(dict.fromkeys([word(g.rng) + "s" if g.rng.random() < 0.6 else g.rng.choice(REAL_UNITS)
                                for _ in range(g.rng.randint(3, 4))]))
    a, b = g.rng.sample(units, 2)
    src, dst = g.rng.choice([("from_unit", "to_unit"), ("source", "target"), ("from", "to"), ("unit_in", "unit_out")])
    name = g.rng.choice([f"convert_{_snake(quantity)}", f"{_snake(quantity)}_converter", f"{_snake(quantity)}_convert"])
    parameters = object_schema(["value", src, dst], value={"type": "number"},
                               **{src: {"type": "string", "enum": units}, dst: {"type": "string", "enum": units}})
    spec = {"type": "function", "function": {"name": name, "description": g.describe_conversion(quantity, units),
                                             "parameters": parameters}}
    n = amount(g.rng)
    x = round(stable_hash("convert", name, a, b) % 10_007 / 997 * float(n), 2)
    c = Call(name, {"value": n, src: a, dst: b}, {"value": n, src: a, dst: b, "result": x})
    user = g.pick(["Convert {n} {a} to {b}.", "How many {b} is {n} {a}?", "{n} {a} in {b}?",
                   "Express {n} {a} as {b}, please.", "What does {n} {a} come to in {b}?",
                   "I have {n} {a}. How much is that in {b}?", "{n} {a} => {b}"]).format(n=fmt(n), a=a, b=b)
    answer = g.pick(["{n} {a} is {x} {b}.", "That is {x} {b}.", "{n} {a} equals {x} {b}."]).format(
        n=fmt(n), a=a, b=b, x=fmt(x))
    tool = InventedTool(spec, quantity, "", "result", b, 2, "code", "value")
    return [tool], [Turn(user, [[c]], answer, Expect(numbers=[x]), [])]


_NUMERIC_ASKS = ["What is the {thing} for {parts}?", "Compute the {thing} with {parts}.", "{Thing}: {parts}?",
                 "Work out the {thing} given {parts}.", "I need the {thing}; {parts}."]


def numeric(g: InventedGen) -> Built:
    """A calculator-like tool of two or three numeric arguments, each said in the request next to its name."""
    thing = new_topic(g.rng, g.taken)
    args = list(dict.fromkeys(g.rng.choice(["amount", "count", "rate", "total", "size", "price", "weight", "years",
                                            word(g.rng)]) for _ in range(g.rng.randint(2, 3))))
    spec = {"type": "function", "function": {
        "name": g.rng.choice([f"compute_{_snake(thing)}", f"{_snake(thing)}_calculator", f"calc_{_snake(thing)}"]),
        "description": f"Compute the {thing} from {', '.join(args)}.",
        "parameters": object_schema(args, **{a: {"type": "number"} for a in args})}}
    values = {a: amount(g.rng) for a in args}
    x = round(stable_hash("numeric", *values.values()) % 100_003 / 97, 2)
    c = Call(spec["function"]["name"], values, values | {_snake(thing): x})
    parts = g.rng.choice([", ".join(f"{a} {fmt(v)}" for a, v in values.items()),
                          " and ".join(f"{fmt(v)} {a}" for a, v in values.items()),
                          ", ".join(f"{a} = {fmt(v)}" for a, v in values.items())])
    user = g.pick(_NUMERIC_ASKS).format(thing=thing, Thing=thing.capitalize(), parts=parts)
    tool = InventedTool(spec, thing, "", _snake(thing), "", 2, "code", args[0])
    return [tool], [Turn(user, [[c]], f"The {thing} is {fmt(x)}.", Expect(numbers=[x]), [])]


KINDS: dict[str, tuple[Callable[[InventedGen], Built], int]] = {
    "broad_single": (single, 40), "broad_parallel": (parallel, 15), "broad_follow_up": (follow_up, 12),
    "broad_refusal": (refusal, 10), "broad_convert": (convert, 12), "broad_numeric": (numeric, 11)}


def invented_episode(seed: int, index: int, pieces: tuple[str, ...] = ()) -> Episode:
    """Train episode `index` of `seed` over invented tools; `pieces`: see `word_pieces`."""
    return InventedGen(Draws(f"{seed}/broad/{index}", pieces)).episode()
