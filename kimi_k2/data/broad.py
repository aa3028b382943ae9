"""Open-vocabulary tool use: every episode invents its topic words, tool names, argument names and values.

generic.py invents tools from 24 fixed topics and values from small word lists, so a small model still meets only a
few hundred distinct tokens in the places it must copy or match, and learns them rather than the skill: on held-out
requests it copies a train item ("bamboo ladder") for "desk lamp" and calls whichever tool it saw most. Here the
words come from a syllable generator over the whole alphabet and, given a tokenizer (`--vocab`), from its word pieces
too, so argument values and topic words cover the vocabulary; the skills are the same ones, spread over it:
- pick the declared tool whose name, description (an alias the request may use instead) or enum values share words
  with the request, among 1-4 distractors; refuse when none does;
- copy argument values out of the request: names, codes, dates, numbers, and enum words into the right arguments;
- answer by quoting the result's numbers with their unit.
Requests are composed from an opener, one of many sentence patterns and a closer, so no one phrasing dominates.
Opt-in variants (experiments/README.md, experiment 4): sessions, several requests over one declared tool set
(`session_episode`), topic words in another case in the tools than in the request (`recase`), and free-form tool
descriptions (`freeform_description`).

Why the word pieces: a token that is never a training target has its output row pushed toward the common "never
emit" direction by every SFT step (measured on the third SFT pass: 4,500 of 6,400 rows at cosine 0.99 with their
mean, against 0.67 after pretraining), and then no amount of skill can copy it: the held-out call
`convert_temperature(..., "celsius")` cost 12-19 nats at "temperature" and "celsius". Built from the pieces, invented
words make every word piece a copy target, in names, values and answers, with and without a leading space.

Nothing here is held out: words that are held-out values are never made, numeric arguments are integers >= 7 or
non-integers >= 401 as in synthetic.py, held-out topics (temperatures, forecasts, distances, day counts, elements,
bills, carts) stay out, and no pattern is a held-out phrasing (`synthetic.check_heldout` holds for the mix).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kimi_k2.data.generic import _HELDOUT_WORDS, Subject, _after_number, add_distractors, date, is_heldout_word
from kimi_k2.data.synthetic import REFUSAL, Call, Episode, Expect, Turn, fmt, train_episode
from kimi_k2.data.tools import TOOLS, _hash, _obj
from kimi_k2.tokenizer import Tokenizer

# the topics of the held-out tools, never a whole invented word (a piece of a longer one is fine)
_HELDOUT_TOPICS = {w for t in TOOLS.values() if t.split == "heldout" for w in t.name.split("_")} - {
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
_REAL_UNITS = ["percent", "points", "units", "dollars", "euros", "grams", "litres", "metres", "seconds", "minutes",
               "hours", "watts", "volts", "bytes", "megabytes", "pascals", "knots", "acres", "hectares", "pounds",
               "ounces", "pints", "gallons", "joules", "newtons", "lumens", "tons"]
_REAL_NOUNS = ["kettle", "pillow", "tablet", "router", "bicycle", "camera", "guitar", "sofa",
               "printer", "speaker", "stapler", "wallet", "umbrella", "charger", "blender", "toaster", "monitor",
               "keyboard", "tent", "compass", "pencil", "basketball", "skateboard", "microwave", "thermos", "poster"]
_REAL_NOUNS = [w for w in _REAL_NOUNS if w not in _HELDOUT_WORDS]
_QUANTITIES = ["length", "weight", "volume", "area", "speed", "energy", "pressure", "power", "data size"]
_VERBS = ["get", "lookup", "fetch", "find", "check", "query", "read", "compute", "estimate", "show", "list", "search"]


class Draws(random.Random):
    """The random source of one episode, with the word pieces its invented words may be made of (none: syllables),
    whether its words vary in case between the tools and the requests (`cased`), and whether its tools' descriptions
    are free-form sentences (`freeform`, `freeform_description`) rather than the six templates."""

    def __init__(self, seed: str, pieces: tuple[str, ...] = (), cased: bool = False, freeform: bool = False):
        super().__init__(seed)
        self.pieces = pieces
        self.cased = cased
        self.freeform = freeform


def recase(rng: random.Random, text: str) -> str:
    """In a `cased` episode, half the time `text` Capitalised or in Title Case (as descriptions and sentence starts
    write words that requests and enums write in lower case: "Celsius" / "celsius", "Forecast" / "forecast")."""
    if not (isinstance(rng, Draws) and rng.cased) or rng.random() < 0.5:
        return text
    return text.capitalize() if rng.random() < 0.5 else text.title()


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
            if {w, w.removesuffix("s")} & _HELDOUT_TOPICS:
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
            in _HELDOUT_WORDS:
        pass
    return c + (f"-{rng.randint(10, 9999)}" if rng.random() < 0.4 else "")


def amount(rng: random.Random) -> int | float:
    """A numeric argument: an integer >= 7 or a non-integer >= 401 (smaller ones are held out)."""
    if rng.random() < 0.6:
        return rng.choice([rng.randint(7, 60), rng.randint(7, 9999)])
    return round(rng.uniform(401, 99999), rng.choice([1, 2]))


_SUBJECTS = {
    "place": Subject("place", ["city", "town", "place", "location", "region", "site"], proper),
    "person": Subject("person", ["name", "person", "user", "member", "customer"], proper),
    "object": Subject("item", ["item", "product", "object", "article", "thing"], thing_name),
    "code": Subject("code", ["code", "id", "ref", "ticker", "sku", "serial"], code),
    "date": Subject("date", ["date", "day", "on"], date),  # generic.date: 2025-2026 (held-out dates are in 2027)
}

# ---- tools ------------------------------------------------------------------------------------------------------


@dataclass
class Tool:
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


def make_tool(rng: random.Random, taken: set[str]) -> Tool:
    """A lookup tool for an invented topic of one subject, with maybe a count and an enum argument."""
    thing = new_topic(rng, taken)
    alias = word(rng) if rng.random() < 0.25 else ""
    subject = rng.choice(list(_SUBJECTS))
    noun, arg_names = _SUBJECTS[subject].noun, _SUBJECTS[subject].arg_names
    arg = rng.choice(arg_names) if rng.random() < 0.8 else f"{word(rng, 1)}_{rng.choice(arg_names)}"
    t, s = _snake(thing), "object" if subject == "object" else subject
    while (name := rng.choice([f"{rng.choice(_VERBS)}_{t}", t, f"{t}_lookup", f"{s}_{t}", f"{t}_by_{s}",
                               f"{rng.choice(_VERBS)}_{s}_{t}", f"{rng.choice(_VERBS)}{t.title().replace('_', '')}"])
           ) in TOOLS:
        pass
    desc = rng.choice(["Get the {thing} of a {noun}.", "Returns the current {thing} for the given {noun}.",
                       "{Thing} lookup by {noun} (invented data).", "Look up {thing} data for one {noun}.",
                       "The {thing} of a {noun}, from the {word} service.", "Reports a {noun}'s {thing}."])
    desc = desc.format(thing=recase(rng, thing), Thing=thing.capitalize(), noun=noun, word=word(rng))
    if isinstance(rng, Draws) and rng.freeform:
        desc = freeform_description(rng, thing, noun)
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
        choices = tuple(rng.sample(_REAL_UNITS, 2) if option == "unit" else
                        [word(rng) for _ in range(rng.randint(2, 4))])
        props[option] = {"type": "string", "enum": list(dict.fromkeys(choices))}
        names.append(option)
    unit = rng.choice(_REAL_UNITS) if rng.random() < 0.6 else (word(rng) + "s" if rng.random() < 0.5 else "")
    spec = {"type": "function", "function": {"name": name, "description": desc,
                                             "parameters": _obj(names[:1] + [n for n in names[1:]
                                                                             if rng.random() < 0.7], **props)}}
    key = _snake(thing) if rng.random() < 0.6 else rng.choice(["value", "result", "amount"])
    if key in {"unit", *names}:  # the result holds the arguments and the unit too
        key = "result"
    return Tool(spec, thing, alias, key, unit, rng.choice([0, 0, 1, 2]), subject, arg, count, option, choices)


_QUALIFIERS = ["Daily", "Current", "Live", "Estimated", "Historical", "Simulated", "Official", "Approximate",
               "Average", "Latest", "Weekly", "Projected", "Measured", "Typical", "Peak", "Hourly"]
_SETTINGS = ["for a {noun}", "of the given {noun}", "for one {noun} at a time", "for any {noun} you name",
             "across a {noun}", "near a {noun}", "by {noun}", "at the requested {noun}"]
_AFTERWORDS = ["", "", " (simulated data).", " in {unit}.", ", updated every hour.", ". Results are approximate.",
               ", from the {word} index.", ", rounded to whole {unit}.", ". Uses the {word} method.",
               " for the next few days.", ", as reported by the {word} service."]


def freeform_description(rng: random.Random, thing: str, noun: str) -> str:
    """A description as real APIs write them: the topic word anywhere in a longer sentence among other words, in any
    case ("Estimated Tide Height near a place, updated every hour.", "Returns the latest ... for a date ...")."""
    t = recase(rng, thing)
    setting = rng.choice(_SETTINGS).format(noun=noun)
    head = rng.choice([f"{rng.choice(_QUALIFIERS)} {t} {setting}", f"Returns the {rng.choice(_QUALIFIERS).lower()} "
                       f"{t} {setting}", f"Look up the {t} {setting}", f"{t.capitalize()} {setting}",
                       f"Gives the {t} and its {word(rng)} {setting}", f"Tells you the {t} {setting}"])
    tail = rng.choice(_AFTERWORDS).format(unit=rng.choice(_REAL_UNITS), word=word(rng))
    return head + (tail if tail.endswith(".") else tail + ".")


# ---- requests and answers ------------------------------------------------------------------------------------------

_OPENERS = ["", "", "", "", "Hi! ", "Hey, ", "Quick question: ", "Hello. ", "Hi there, ", "OK, ", "So, ",
            "I have a question. ", "Excuse me, "]
_ASKS = ["what is the {thing} of {v}{extra}?", "can you look up the {thing} for {v}{extra}?",
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
_LEADING_ASKS = [a for a in _ASKS if a.startswith("{thing}")]  # the topic word opens the request, capitalised
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


class BroadGen:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.templates: list[str] = []
        self.taken: set[str] = set()

    def pick(self, templates: list[str]) -> str:
        t = self.rng.choice(templates)
        self.templates.append(t)
        return t

    def tool(self) -> Tool:
        return make_tool(self.rng, self.taken)

    def call(self, tool: Tool, v: str) -> tuple[Call, str]:
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
        h = _hash("broad", tool.name, *args.values()) % 1_000_003 / 1_000_003
        x = round(h * 10 ** self.rng.randint(1, 5), tool.decimals) if tool.decimals else int(h * 10 ** 5)
        return Call(tool.name, args, args | {tool.key: x} | ({"unit": tool.unit} if tool.unit else {})), extra

    def request(self, tool: Tool, v: str, extra: str) -> str:
        thing = tool.alias if tool.alias and self.rng.random() < 0.5 else tool.thing
        leading = isinstance(self.rng, Draws) and self.rng.cased and self.rng.random() < 0.3
        core = self.pick(_LEADING_ASKS if leading else _ASKS).format(thing=thing, v=v, extra=extra,
                                                                      noun=_SUBJECTS[tool.subject].noun)
        text = ("" if leading else self.rng.choice(_OPENERS)) + core
        text = text if text.startswith(v) else text[0].upper() + text[1:]  # a value keeps its case
        return text + self.rng.choice(_CLOSERS) if text[-1] in ".?!" else text + self.rng.choice(["", "."])

    def answer(self, tool: Tool, c: Call) -> str:
        v = str(c.arguments[tool.arg])
        return self.pick(_ANSWERS).format(thing=tool.thing, Thing=tool.thing.capitalize(), v=v, V=v[0].upper() + v[1:],
                                          x=fmt(c.result[tool.key]), unit=_after_number(tool.unit))

    def single(self, tool: Tool | None = None) -> tuple[Tool, Turn]:
        tool = tool or self.tool()
        c, extra = self.call(tool, _SUBJECTS[tool.subject].value(self.rng))
        turn = Turn(self.request(tool, c.arguments[tool.arg], extra), [[c]], self.answer(tool, c),
                    Expect(numbers=[c.result[tool.key]]), [])
        return tool, turn


def _single(g: BroadGen) -> tuple[list[Tool], list[Turn]]:
    tool, turn = g.single()
    return [tool], [turn]


def _parallel(g: BroadGen) -> tuple[list[Tool], list[Turn]]:
    (t1, a), (t2, b) = g.single(), g.single()
    starts_with_value = any(b.user.startswith(str(v)) for c in b.rounds[0] for v in c.arguments.values())
    user = g.pick(_CONNECTORS).format(a=a.user, b=b.user if starts_with_value else b.user[0].lower() + b.user[1:],
                                      B=b.user)
    return [t1, t2], [Turn(user, [a.rounds[0] + b.rounds[0]], f"{a.answer} {b.answer}",
                           Expect(numbers=a.expect.numbers + b.expect.numbers), [])]


def _follow_up(g: BroadGen) -> tuple[list[Tool], list[Turn]]:
    tool, first = g.single()
    c1 = first.rounds[0][0]
    v = _SUBJECTS[tool.subject].value(g.rng)
    c2, _ = g.call(tool, v)
    c2 = Call(tool.name, c1.arguments | {tool.arg: v}, c2.result | c1.arguments | {tool.arg: v})
    second = Turn(g.pick(_FOLLOWS).format(v=v), [[c2]], g.answer(tool, c2), Expect(numbers=[c2.result[tool.key]]), [])
    return [tool], [first, second]


def _refusal(g: BroadGen) -> tuple[list[Tool], list[Turn]]:
    """An action no declared tool does, or a question about a topic none covers."""
    if g.rng.random() < 0.5:
        obj = f"my {thing_name(g.rng)}" if g.rng.random() < 0.5 else f"the {word(g.rng)} for {proper(g.rng)}"
        user = f"{g.rng.choice(_REFUSE_VERBS)} {obj}{g.rng.choice(_REFUSE_TAILS)}."
    else:
        user = g.single()[1].user  # its tool is not declared; distractors take other topics
    return [], [Turn(user, [], REFUSAL, Expect(refusal=True), [])]


def _convert(g: BroadGen) -> tuple[list[Tool], list[Turn]]:
    """A conversion between enum units: the request names the value and both units, the call copies them."""
    quantity = word(g.rng) if g.rng.random() < 0.5 else g.rng.choice(_QUANTITIES)
    g.taken |= set(quantity.split())
    units = list(dict.fromkeys([word(g.rng) + "s" if g.rng.random() < 0.6 else g.rng.choice(_REAL_UNITS)
                                for _ in range(g.rng.randint(3, 4))]))
    a, b = g.rng.sample(units, 2)
    src, dst = g.rng.choice([("from_unit", "to_unit"), ("source", "target"), ("from", "to"), ("unit_in", "unit_out")])
    name = g.rng.choice([f"convert_{_snake(quantity)}", f"{_snake(quantity)}_converter", f"{_snake(quantity)}_convert"])
    spec = {"type": "function", "function": {
        "name": name, "description": f"Convert a {quantity} between {', '.join(recase(g.rng, u) for u in units[:-1])}"
                                     f" and {recase(g.rng, units[-1])}.",
        "parameters": _obj(["value", src, dst], value={"type": "number"}, **{src: {"type": "string", "enum": units},
                                                                              dst: {"type": "string", "enum": units}})}}
    n = amount(g.rng)
    x = round(_hash("convert", name, a, b) % 10_007 / 997 * float(n), 2)
    c = Call(name, {"value": n, src: a, dst: b}, {"value": n, src: a, dst: b, "result": x})
    user = g.pick(["Convert {n} {a} to {b}.", "How many {b} is {n} {a}?", "{n} {a} in {b}?",
                   "Express {n} {a} as {b}, please.", "What does {n} {a} come to in {b}?",
                   "I have {n} {a}. How much is that in {b}?", "{n} {a} => {b}"]).format(n=fmt(n), a=a, b=b)
    answer = g.pick(["{n} {a} is {x} {b}.", "That is {x} {b}.", "{n} {a} equals {x} {b}."]).format(
        n=fmt(n), a=a, b=b, x=fmt(x))
    tool = Tool(spec, quantity, "", "result", b, 2, "code", "value")
    return [tool], [Turn(user, [[c]], answer, Expect(numbers=[x]), [])]


_NUMERIC_ASKS = ["What is the {thing} for {parts}?", "Compute the {thing} with {parts}.", "{Thing}: {parts}?",
                 "Work out the {thing} given {parts}.", "I need the {thing}; {parts}."]


def _numeric(g: BroadGen) -> tuple[list[Tool], list[Turn]]:
    """A calculator-like tool of two or three numeric arguments, each said in the request next to its name."""
    thing = new_topic(g.rng, g.taken)
    args = list(dict.fromkeys(g.rng.choice(["amount", "count", "rate", "total", "size", "price", "weight", "years",
                                            word(g.rng)]) for _ in range(g.rng.randint(2, 3))))
    spec = {"type": "function", "function": {
        "name": g.rng.choice([f"compute_{_snake(thing)}", f"{_snake(thing)}_calculator", f"calc_{_snake(thing)}"]),
        "description": f"Compute the {thing} from {', '.join(args)}.",
        "parameters": _obj(args, **{a: {"type": "number"} for a in args})}}
    values = {a: amount(g.rng) for a in args}
    x = round(_hash("numeric", *values.values()) % 100_003 / 97, 2)
    c = Call(spec["function"]["name"], values, values | {_snake(thing): x})
    parts = g.rng.choice([", ".join(f"{a} {fmt(v)}" for a, v in values.items()),
                          " and ".join(f"{fmt(v)} {a}" for a, v in values.items()),
                          ", ".join(f"{a} = {fmt(v)}" for a, v in values.items())])
    user = g.pick(_NUMERIC_ASKS).format(thing=thing, Thing=thing.capitalize(), parts=parts)
    tool = Tool(spec, thing, "", _snake(thing), "", 2, "code", args[0])
    return [tool], [Turn(user, [[c]], f"The {thing} is {fmt(x)}.", Expect(numbers=[x]), [])]


KINDS = {"broad_single": (_single, 40), "broad_parallel": (_parallel, 15), "broad_follow_up": (_follow_up, 12),
         "broad_refusal": (_refusal, 10), "broad_convert": (_convert, 12), "broad_numeric": (_numeric, 11)}


def session_episode(seed: int, index: int, pieces: tuple[str, ...] = (), cased: bool = False,
                    freeform: bool = False) -> Episode:
    """Broad session episode `index` of `seed`: 3-4 tools declared once (and at most one distractor), then one user
    turn for each of them in random order, sometimes with a refusal among them. The tool declarations are most of a
    conversation's tokens; here each buys several choices among the same tools, each right one a different tool, so a
    pick must come from the request rather than from which tool looks likeliest."""
    rng = Draws(f"{seed}/broad-session/{index}", pieces, cased, freeform)
    g = BroadGen(rng)
    tools, turns = [], []
    n = rng.randint(3, 4)
    while len(tools) < n:
        (tool,), (turn,) = rng.choices([_single, _convert, _numeric], [40, 12, 11])[0](g)
        if tool.name not in {t.name for t in tools}:  # two conversions of one quantity would share a name
            tools.append(tool)
            turns.append(turn)
    if rng.random() < 0.3:
        turns += _refusal(g)[1]
    rng.shuffle(turns)
    specs = add_distractors(rng, [t.spec for t in tools], rng.randint(0, 1), 0.2, lambda: g.tool().spec)
    for t in turns:
        t.templates = list(g.templates)
    return train_episode("broad_session", specs, turns)


def broad_episode(seed: int, index: int, pieces: tuple[str, ...] = (), cased: bool = False,
                  freeform: bool = False) -> Episode:
    """Broad train episode `index` of `seed`: its tools plus 1-4 distractors (invented tools of other topics, or train
    tools); a refusal declares 1-4 tools, none of them for the request. `pieces`: see `word_pieces`."""
    rng = Draws(f"{seed}/broad/{index}", pieces, cased, freeform)
    kind = rng.choices(list(KINDS), [w for _, w in KINDS.values()])[0]
    g = BroadGen(rng)
    tools, turns = KINDS[kind][0](g)
    specs = add_distractors(rng, [t.spec for t in tools], rng.randint(1, 4), 0.2, lambda: g.tool().spec)
    for t in turns:
        t.templates = list(g.templates)
    return train_episode(kind, specs, turns)
