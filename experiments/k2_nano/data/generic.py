"""Generic tool use, the nano model's second generation of train data (`--generic F` of experiments/k2_nano/synth.py):
conversations over tools invented per episode from 24 fixed topics ("rainfall", "hotel price", ...) crossed with a
subject kind (a place, a person, an item, a code, a date, a from/to route), named and described by one of several
patterns, with values from small invented pools and results from a hash of the call. Kinds: single, same tool twice
in parallel, two tools in parallel, follow-up turn, no declared tool fits, two-round chain (find an id, then look up
by it), stateful collection, list results. Superseded in the product by kimi_k2/data/invented.py (open vocabulary);
kept because the shipped K2-Nano passes were trained on it (scripts/build_nano.sh) and experiments/README.md measures
it.

Nothing here is held out: names, topics and values are drawn away from the held-out halves of kimi_k2/eval (held-out
tools, cities, items, element symbols, 2027 dates, integers <= 6, non-integers below 401), so
`kimi_k2.data.heldout.check_heldout` holds for train sets that mix these episodes in.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from kimi_k2.data.heldout import HELDOUT_WORDS, is_heldout_word
from kimi_k2.data.invented import Subject, add_distractors, after_number, date
from kimi_k2.eval.scenarios import REFUSAL, Call, Episode, Expect, Turn, fmt, train_episode
from kimi_k2.eval.schema import object_schema
from kimi_k2.eval.tools import stable_hash

# ---- subjects: what a tool is asked about (argument kind, argument names, value generator) -------------------------

_SYLLABLES = ["ka", "lo", "mer", "tan", "vi", "dor", "sel", "qua", "ri", "bel", "zan", "tor", "mi", "ven", "ast",
              "or", "pel", "ga", "nor", "ul", "ther", "cas", "di", "mon", "sur", "fen", "yal", "bri", "ko", "ran"]
_PREFIXES = ["Port", "New", "San", "Lake", "Fort", "North", "East", "Upper"]
_FIRST = ["Anya", "Boris", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hiro", "Ines", "Jonas", "Kofi", "Leila",
          "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tala", "Umar", "Vera", "Wen", "Yusuf"]
_ADJECTIVES = ["red", "wooden", "small", "steel", "glass", "cotton", "leather", "green", "silver", "folding", "wool",
               "ceramic", "bamboo", "copper", "striped", "large"]
_OBJECTS = ["kettle", "ladder", "mug", "chair", "scarf", "bucket", "hammer", "mirror", "blanket", "shelf", "spoon",
            "candle", "teapot", "rug", "clock", "vase", "bench", "jacket", "helmet", "drawer"]


def _word(rng: random.Random) -> str:
    while True:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice([2, 2, 3]))).capitalize()
        if not is_heldout_word(w):
            return w


def place(rng: random.Random) -> str:
    return f"{rng.choice(_PREFIXES)} {_word(rng)}" if rng.random() < 0.25 else _word(rng)


def person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {_word(rng)}"


def item(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)}"


def code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    while True:
        c = "".join(rng.choice(letters) for _ in range(rng.randint(2, 4)))
        if rng.random() < 0.3:
            c += str(rng.randint(10, 99))
        if c.lower() not in HELDOUT_WORDS:
            return c


SUBJECTS = {
    "place": Subject("place", ["city", "town", "place", "location"], place),
    "person": Subject("person", ["name", "person", "contact"], person),
    "item": Subject("product", ["item", "product", "article"], item),
    "code": Subject("code", ["code", "symbol", "ticker", "sku"], code),
    "date": Subject("date", ["date", "day"], date),
}

# ---- topics: what a tool returns (result key, unit, value range, decimals, subjects, optional count argument) ------


@dataclass(frozen=True)
class Topic:
    thing: str  # "rainfall"
    key: str  # result field
    unit: str  # written after the value in answers ("" for none)
    lo: float
    hi: float
    decimals: int
    subjects: tuple[str, ...]  # "place", ... or "place-pair" (a from/to route between two places)
    count: str = ""  # an optional integer argument ("nights"), asked for as "for N nights"
    option: str = ""  # an optional enum argument ("unit"), asked for as "in mph" / "by bus"
    choices: tuple[str, ...] = ()


TOPICS = [Topic(*t) for t in [
    ("population", "population", "people", 1000, 9_000_000, 0, ("place",)),
    ("elevation", "elevation_m", "m", -40, 4200, 0, ("place",)),
    ("rainfall", "rainfall", "mm", 0, 320, 1, ("place",), "", "unit", ("mm", "inches")),
    ("air quality index", "aqi", "", 5, 300, 0, ("place",)),
    ("wind speed", "wind_speed", "km/h", 0, 95, 1, ("place",), "", "unit", ("km/h", "mph", "knots")),
    ("average rent", "rent", "dollars", 300, 4000, 2, ("place",), "months"),
    ("hotel price", "price", "dollars", 40, 6000, 2, ("place",), "nights"),
    ("price", "price", "dollars", 0.5, 900, 2, ("item",), "quantity", "currency", ("USD", "EUR", "GBP", "JPY")),
    ("stock level", "in_stock", "units", 0, 800, 0, ("item",)),
    ("shipping cost", "shipping", "dollars", 1, 60, 2, ("item",), "quantity"),
    ("rating", "rating", "stars", 1, 5, 1, ("item", "place")),
    ("weight", "weight", "kg", 0.1, 45, 2, ("item",), "", "unit", ("kg", "lb", "g")),
    ("age", "age", "years", 18, 95, 0, ("person",)),
    ("account balance", "balance", "dollars", -900, 25000, 2, ("person",)),
    ("loyalty points", "points", "points", 0, 9000, 0, ("person",)),
    ("share price", "price", "dollars", 1, 950, 2, ("code",)),
    ("trading volume", "volume", "shares", 1000, 900000, 0, ("code",)),
    ("change today", "change_percent", "%", -9, 9, 2, ("code",)),
    ("visitor count", "visitors", "visitors", 50, 90000, 0, ("date", "place")),
    ("energy price", "price_kwh", "dollars per kWh", 0.05, 0.6, 3, ("date",)),
    ("step count", "steps", "steps", 500, 25000, 0, ("date", "person")),
    ("travel time", "minutes", "minutes", 20, 2000, 0, ("place-pair",), "", "mode", ("car", "train", "bus", "bike")),
    ("train fare", "fare", "dollars", 8, 400, 2, ("place-pair",), "tickets"),
    ("shipping time", "hours", "hours", 2, 240, 0, ("place-pair",)),
]]
# held-out tools' topics stay out: no distance, temperature/forecast, day counts, elements, bills or carts here
_PAIRS = [("from_place", "to_place"), ("origin", "destination"), ("start", "end"), ("from_city", "to_city"),
          ("source", "target")]
_VERBS = ["get", "lookup", "fetch", "find", "check", "query", "compute"]
_DESCRIPTIONS = ["Get the {thing} of a {noun}.", "Look up the current {thing} for a given {noun} (invented data).",
                 "Returns the {thing} for the {noun} you name.", "{Thing} lookup by {noun}.",
                 "Fetch {thing} data for one {noun}."]
_PAIR_DESCRIPTIONS = ["The {thing} from one place to another.", "{Thing} between two places (invented data).",
                      "Estimate the {thing} of a trip from an origin to a destination."]


@dataclass
class GenericTool:
    spec: dict
    topic: Topic
    subject: str
    args: list[str]  # argument names: the subject's one or two, then the count argument if any

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]


def make_tool(rng: random.Random, topic: Topic, subject: str, with_count: bool, with_option: bool) -> GenericTool:
    """A tool for `topic` of `subject`, named and described by one of several patterns."""
    thing = topic.thing.replace(" ", "_")
    short = "route" if subject == "place-pair" else subject
    name = rng.choice([f"{rng.choice(_VERBS)}_{thing}", f"{thing}_lookup", f"{short}_{thing}",
                       f"{rng.choice(_VERBS)}_{short}_{thing}"])
    if subject == "place-pair":
        desc = rng.choice(_PAIR_DESCRIPTIONS)
        names = list(rng.choice(_PAIRS))
        props = {n: {"type": "string"} for n in names}
    else:
        s = SUBJECTS[subject]
        desc = rng.choice(_DESCRIPTIONS).replace("{noun}", s.noun)
        names = [rng.choice(s.arg_names)]
        props = {names[0]: {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "YYYY-MM-DD"}
                 if subject == "date" else {"type": "string"}}
    if with_count and topic.count:
        names.append(topic.count)
        props[topic.count] = {"type": "integer", "minimum": 1}
    if with_option and topic.option:
        names.append(topic.option)
        props[topic.option] = {"type": "string", "enum": list(topic.choices)}
    desc = desc.format(thing=topic.thing, Thing=topic.thing.capitalize())
    spec = {"type": "function",
            "function": {"name": name, "description": desc, "parameters": object_schema(names, **props)}}
    return GenericTool(spec, topic, subject, names)


def _value(topic: Topic, *parts: object) -> float | int:
    h = stable_hash("generic", topic.key, *parts)
    x = topic.lo + (h % 1_000_003) / 1_000_003 * (topic.hi - topic.lo)
    return round(x, topic.decimals) if topic.decimals else int(x)


# ---- episodes ---------------------------------------------------------------------------------------------------

# {v}: the subject (or route start), {w}: the route end, {n} {count}: the count argument
_ASK = ["What is the {thing} of {v}?", "Can you look up the {thing} for {v}?", "Tell me the {thing} of {v}.",
        "I need the current {thing} for {v}.", "{Thing} of {v}?", "Please find the {thing} for {noun} {v}.",
        "Check the {thing} for {v}, please.", "What's {v}'s {thing}?"]
_ASK_PAIR = ["What is the {thing} from {v} to {w}?", "{Thing} between {v} and {w}?",
             "How about the {thing} for a trip from {v} to {w}?", "Check the {thing} from {v} to {w}, please."]
_ASK_COUNT = [" for {n} {count}", ", {n} {count}"]
_ANSWER = ["The {thing} of {v} is {x}{unit}.", "{V} has a {thing} of {x}{unit}.", "{Thing} for {v}: {x}{unit}.",
           "According to the tool, the {thing} of {v} is {x}{unit}."]
_ANSWER_PAIR = ["The {thing} from {v} to {w} is {x}{unit}.", "From {v} to {w}, the {thing} is {x}{unit}."]
_FOLLOW = ["And for {v}?", "What about {v}?", "Same for {v}, please."]
_FOLLOW_PAIR = ["And from {v} to {w}?", "What about from {v} to {w}?", "Same from {v} to {w}, please."]
_TWO = ["What is the {thing} of {v} and of {w}?", "Compare the {thing} of {v} and {w}.",
        "Look up the {thing} for both {v} and {w}."]
_CONNECT = ["{a} Also, {b}", "Two things. {a} And {b}", "{a} Next, {b}"]


class GenericGen:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.templates: list[str] = []
        self.topics: set[str] = set()  # topics of the tools made so far (distractors take others)

    def pick(self, templates: list[str], **values: object) -> str:
        t = self.rng.choice(templates)
        self.templates.append(t)
        return t.format(**values)

    def tool(self, with_count: bool | None = None, subjects: tuple[str, ...] | None = None) -> GenericTool:
        topic = self.rng.choice([t for t in TOPICS if t.thing not in self.topics
                                 and (subjects is None or set(t.subjects) & set(subjects))])
        self.topics.add(topic.thing)
        subject = self.rng.choice([s for s in topic.subjects if subjects is None or s in subjects])
        count = self.rng.random() < 0.5 if with_count is None else with_count
        return make_tool(self.rng, topic, subject, count, self.rng.random() < 0.6)

    def values(self, tool: GenericTool) -> tuple[str, str | None]:
        gen = SUBJECTS["place" if tool.subject == "place-pair" else tool.subject].value
        v = gen(self.rng)
        w = gen(self.rng) if tool.subject == "place-pair" else None
        while w == v:
            w = gen(self.rng)
        return v, w

    def call(self, tool: GenericTool, v: str, w: str | None, n: int | None, option: str | None = None) -> Call:
        t = tool.topic
        args = dict(zip(tool.args, [x for x in (v, w, n, option) if x is not None], strict=True))
        x = _value(t, *args.values())
        unit = option if t.option == "unit" or t.option == "currency" and option else t.unit
        return Call(tool.name, args, args | {t.key: x} | ({"unit": unit} if unit else {}))

    def option(self, tool: GenericTool) -> str | None:
        return self.rng.choice(tool.topic.choices) if tool.topic.option in tool.args else None

    def answer(self, tool: GenericTool, c: Call) -> str:
        t = tool.topic
        v, w, *_ = list(c.arguments.values()) + [None]
        w = w if tool.subject == "place-pair" else None
        values = dict(thing=t.thing, Thing=t.thing.capitalize(), v=v, w=w, x=fmt(c.result[t.key]),
                      unit=after_number(c.result.get("unit", t.unit)))
        if tool.subject == "place-pair":
            return self.pick(_ANSWER_PAIR, **values)
        return self.pick(_ANSWER, **values, V=v[0].upper() + v[1:])

    def ask(self, tool: GenericTool) -> tuple[str, Call]:
        v, w = self.values(tool)
        n = self.rng.randint(7, 40) if tool.topic.count in tool.args else None
        o = self.option(tool)
        c = self.call(tool, v, w, n, o)
        t = tool.topic
        values = dict(thing=t.thing, Thing=t.thing.capitalize(), v=v, w=w,
                      noun=SUBJECTS.get(tool.subject, SUBJECTS["place"]).noun)
        user = self.pick(_ASK_PAIR if tool.subject == "place-pair" else _ASK, **values)
        return self.qualify(user, tool, n, o), c

    def qualify(self, user: str, tool: GenericTool, n: int | None, o: str | None) -> str:
        """The request with its count and option arguments said before the final punctuation."""
        if n is not None:
            user = user[:-1] + self.pick(_ASK_COUNT, n=n, count=tool.topic.count) + user[-1]
        if o is not None:
            user = user[:-1] + (f" by {o}" if tool.topic.option == "mode" else f" in {o}") + user[-1]
        return user

    def single(self) -> tuple[GenericTool, Turn]:
        tool = self.tool()
        user, c = self.ask(tool)
        return tool, Turn(user, [[c]], self.answer(tool, c), Expect(numbers=[c.result[tool.topic.key]]), [])


def _episode_single(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    tool, turn = g.single()
    return [tool], [turn]


def _episode_same_tool_twice(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    tool = g.tool(with_count=False, subjects=("place", "person", "item", "code"))
    (v, _), (w, _) = g.values(tool), g.values(tool)
    if v == w:
        return _episode_single(g)
    o = g.option(tool)
    c1, c2 = g.call(tool, v, None, None, o), g.call(tool, w, None, None, o)
    user = g.qualify(g.pick(_TWO, thing=tool.topic.thing, v=v, w=w), tool, None, o)
    key = tool.topic.key
    turn = Turn(user, [[c1, c2]], f"{g.answer(tool, c1)} {g.answer(tool, c2)}",
                Expect(numbers=[c1.result[key], c2.result[key]]), [])
    return [tool], [turn]


def _episode_parallel(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    (t1, a), (t2, b) = g.single(), g.single()
    user = g.pick(_CONNECT, a=a.user, b=b.user[0].lower() + b.user[1:])
    turn = Turn(user, [a.rounds[0] + b.rounds[0]], f"{a.answer} {b.answer}",
                Expect(numbers=a.expect.numbers + b.expect.numbers), [])
    return [t1, t2], [turn]


def _episode_follow_up(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    tool, first = g.single()
    c1 = first.rounds[0][0]
    v, w = g.values(tool)
    c2 = g.call(tool, v, w, c1.arguments.get(tool.topic.count), c1.arguments.get(tool.topic.option))
    user = g.pick(_FOLLOW_PAIR, v=v, w=w) if w is not None else g.pick(_FOLLOW, v=v)
    second = Turn(user, [[c2]], g.answer(tool, c2), Expect(numbers=[c2.result[tool.topic.key]]), [])
    return [tool], [first, second]


def _episode_no_tool_fits(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    """The request names a topic that no declared tool covers: the answer says so instead of calling one."""
    other = g.tool()
    user, _ = g.ask(other)  # g.tool() recorded its topic, so no distractor covers it
    return [], [Turn(user, [], REFUSAL, Expect(refusal=True), [])]


_CODE_ASK = ["What is the {thing} of {v}? You will need its {code} first.",
             "Find the {code} of {v}, then look up its {thing}.", "I want the {thing} for {v}; look it up by {code}."]


def _episode_chain(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    """Two rounds: the first call finds an identifier, the second uses the value it returned."""
    topic = g.rng.choice([t for t in TOPICS if "code" in t.subjects])
    g.topics.add(topic.thing)
    kind = g.rng.choice(["item", "person", "place"])
    code_name = g.rng.choice(["code", "id", "ticker", "ref"])
    arg = g.rng.choice(SUBJECTS[kind].arg_names)
    finder = GenericTool({"type": "function", "function": {
        "name": g.rng.choice([f"find_{kind}_{code_name}", f"{kind}_{code_name}_search", f"resolve_{code_name}"]),
        "description": f"Find the {code_name} of a {SUBJECTS[kind].noun} by its name.",
        "parameters": object_schema([arg], **{arg: {"type": "string"}})}}, topic, kind, [arg])
    by_code = make_tool(g.rng, topic, "code", False, False)
    by_code.spec["function"]["parameters"] = object_schema([code_name], **{code_name: {"type": "string"}})
    by_code.args = [code_name]
    v = SUBJECTS[kind].value(g.rng)
    ident = code(g.rng)
    c1 = Call(finder.name, {arg: v}, {arg: v, code_name: ident})
    x = _value(topic, ident)
    c2 = Call(by_code.name, {code_name: ident}, {code_name: ident, topic.key: x})
    user = g.pick(_CODE_ASK, thing=topic.thing, v=v, code=code_name)
    answer = f"The {code_name} of {v} is {ident}, and its {topic.thing} is {fmt(x)}{after_number(topic.unit)}."
    return [finder, by_code], [Turn(user, [[c1], [c2]], answer, Expect(numbers=[x]), [])]


_COLLECTIONS = ["wishlist", "order", "pantry", "packing list", "gift list", "inventory"]
_ADD_ASK = ["Add {q} {item} to my {coll}.", "Please put {item} on the {coll}, {q} of them.",
            "{q} x {item} into my {coll}, please."]
_SHOW_ASK = ["What's in my {coll} now?", "Show me the {coll} with the total.", "How much does my {coll} come to?"]


def _episode_collection(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    """Multi-turn, with state: add one to three items, then show the collection with its total."""
    coll = g.rng.choice(_COLLECTIONS)
    snake = coll.replace(" ", "_")
    price = next(t for t in TOPICS if t.thing == "price")
    add = GenericTool({"type": "function", "function": {
        "name": g.rng.choice([f"add_to_{snake}", f"{snake}_add"]), "description": f"Add an item to the user's {coll}.",
        "parameters": object_schema(["item", "quantity"], item={"type": "string"},
                           quantity={"type": "integer", "minimum": 1})}}, price, "item", ["item", "quantity"])
    show = GenericTool({"type": "function", "function": {
        "name": g.rng.choice([f"view_{snake}", f"show_{snake}", f"{snake}_summary"]),
        "description": f"Show the {coll} with each line's subtotal and the total in dollars.",
        "parameters": object_schema([])}}, price, "item", [])
    lines: dict[str, int] = {}
    turns = []
    for _ in range(g.rng.randint(1, 3)):
        it, q = item(g.rng), g.rng.randint(7, 30)
        unit_price = _value(price, it)
        lines[it] = lines.get(it, 0) + q
        c = Call(add.name, {"item": it, "quantity": q}, {"item": it, "quantity": lines[it], "unit_price": unit_price})
        turns.append(Turn(g.pick(_ADD_ASK, q=q, item=it, coll=coll), [[c]],
                          f"I added {q} x {it} to your {coll}, at {fmt(unit_price)} dollars each.",
                          Expect(contains=[it]), []))
    rows = [{"item": k, "quantity": q, "subtotal": round(q * _value(price, k), 2)} for k, q in lines.items()]
    total = round(sum(r["subtotal"] for r in rows), 2)
    c = Call(show.name, {}, {"items": rows, "total": total})
    listing = "; ".join(f"{r['item']}: {r['quantity']} ({fmt(r['subtotal'])} dollars)" for r in rows)
    turns.append(Turn(g.pick(_SHOW_ASK, coll=coll), [[c]], f"Your {coll} has {listing}. The total is {fmt(total)} "
                      "dollars.", Expect(numbers=[total]), []))
    return [add, show], turns


_SERIES_ASK = ["What was the {thing} of {v} over the last {k} years?", "Show the {thing} history for {v}.",
               "Year by year, how has the {thing} of {v} changed?"]


def _episode_series(g: GenericGen) -> tuple[list[GenericTool], list[Turn]]:
    """A result holding a list of records; the answer quotes one field of each."""
    tool = g.tool(with_count=False, subjects=("place", "person", "item", "code"))
    tool.spec["function"]["name"] = tool.name + "_history"
    tool.spec["function"]["description"] = f"Yearly {tool.topic.thing} of a {SUBJECTS[tool.subject].noun}, " \
                                           "one record per year (invented data)."
    tool.spec["function"]["parameters"] = object_schema(tool.args[:1], **{tool.args[0]: {"type": "string"}})
    v = SUBJECTS[tool.subject].value(g.rng)
    years = list(range(2026 - g.rng.randint(2, 4), 2026))
    key = tool.topic.key
    rows = [{"year": y, key: _value(tool.topic, v, y), "rank": g.rng.randint(1, 99)} for y in years]
    c = Call(tool.name, {tool.args[0]: v}, {tool.args[0]: v, "history": rows})
    user = g.pick(_SERIES_ASK, thing=tool.topic.thing, v=v, k=len(years))
    answer = f"The {tool.topic.thing} of {v} by year: " + ", ".join(f"{r['year']}: {fmt(r[key])}" for r in rows) + "."
    return [tool], [Turn(user, [[c]], answer, Expect(numbers=[r[key] for r in rows]), [])]


GENERIC_KINDS: dict[str, tuple[Callable[[GenericGen], tuple[list[GenericTool], list[Turn]]], int]] = {
    "generic_single": (_episode_single, 40), "generic_same_tool_twice": (_episode_same_tool_twice, 12),
    "generic_parallel": (_episode_parallel, 15), "generic_follow_up": (_episode_follow_up, 20),
    "generic_no_tool_fits": (_episode_no_tool_fits, 10), "generic_chain": (_episode_chain, 12),
    "generic_collection": (_episode_collection, 10), "generic_series": (_episode_series, 8),
}


def generic_episode(seed: int, index: int) -> Episode:
    """Generic train episode `index` of `seed`: its needed tools plus distractors (invented tools of other topics, or
    train tools); a no-tool-fits episode declares 1-3 tools, none of them for the asked topic."""
    rng = random.Random(f"{seed}/generic/{index}")
    kind = rng.choices(list(GENERIC_KINDS), [w for _, w in GENERIC_KINDS.values()])[0]
    g = GenericGen(rng)
    tools, turns = GENERIC_KINDS[kind][0](g)
    specs = add_distractors(rng, [t.spec for t in tools], rng.randint(1 if not tools else 0, 3), 0.3,
                            lambda: g.tool().spec)
    for t in turns:
        t.templates = list(g.templates)
    return train_episode(kind, specs, turns)
