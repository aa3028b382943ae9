"""Reference episodes over the executable tools (tools.py) in OpenAI format, deterministic given (seed, split, index).

An `Episode` is built by running real tools (tools.ToolEnv), so every tool result and every final answer that quotes it
is what the tool returns. From an episode come both a training conversation (`conversation()`: `messages` with
`tool_calls` whose ids are `functions.{name}:{n}`, n counting every call of the conversation from 0, the id format of
MoonshotAI/Kimi-K2 docs/tool_call_guidance.md) and an eval task (`task()`: the user turns plus what a right answer must
contain): the benchmarks (benchmarks.py) are held-out episodes scored against the same tools, and the training data
(kimi_k2.data) takes train episodes.

Held-out episodes use tools, argument values and user phrasings that train episodes never use: held-out tools and
values come from the held-out halves of world.py, numbers from disjoint ranges (train numeric arguments are integers
>= 7; held-out ones are integers <= 6 or non-integers), phrasings from phrasings.py (`kimi_k2.data.heldout` checks
all three on generated data).
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from decimal import Decimal

from kimi_k2.eval import world
from kimi_k2.eval.phrasings import CONNECT, UNIT_NAMES, USER
from kimi_k2.eval.tools import TOOLS, UNITS, Split, ToolEnv, tools_of

SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."
KINDS = ["single", "parallel", "sequential", "multi_turn", "refusal", "identity", "arithmetic", "fact"]
WEIGHTS = [30, 12, 10, 10, 10, 8, 12, 8]
CHAT_KINDS = KINDS[5:]


@dataclass
class Call:
    name: str
    arguments: dict
    result: dict


@dataclass
class Expect:
    """What a right final answer to one user turn shows. Numbers match within 0.01; strings case-insensitively."""

    numbers: list[float] = field(default_factory=list)
    contains: list[str] = field(default_factory=list)
    exact: str | None = None  # exact-match target (the whole short answer, or its final number)
    refusal: bool = False


@dataclass
class Turn:
    user: str
    rounds: list[list[Call]]  # each round: the parallel calls of one assistant message, then their results
    answer: str
    expect: Expect
    templates: list[str]


@dataclass
class Episode:
    kind: str
    split: Split
    tools: list[str]
    turns: list[Turn]
    state: dict  # the tool environment's state at the end (Tau2-style: a right episode leaves the same state)
    specs: dict[str, dict] = field(default_factory=dict)  # tools invented for this episode: name -> spec

    def tool_specs(self) -> list[dict]:
        return [self.specs[t] if t in self.specs else TOOLS[t].spec() for t in self.tools]

    def parameters(self, name: str) -> dict:
        return self.specs[name]["function"]["parameters"] if name in self.specs else TOOLS[name].parameters

    def conversation(self) -> dict:
        messages: list[dict] = [{"role": "system", "content": SYSTEM}]
        n = 0
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            for calls in turn.rounds:
                ids = [f"functions.{c.name}:{n + i}" for i, c in enumerate(calls)]
                n += len(calls)
                messages.append({"role": "assistant", "content": None, "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                    for i, c in zip(ids, calls, strict=True)]})
                messages += [{"role": "tool", "tool_call_id": i, "name": c.name, "content": json.dumps(c.result)}
                             for i, c in zip(ids, calls, strict=True)]
            messages.append({"role": "assistant", "content": turn.answer})
        return {"kind": self.kind, "split": self.split, "messages": messages,
                "tools": self.tool_specs()}

    def task(self, task_id: str) -> dict:
        return {"id": task_id, "kind": self.kind, "system": SYSTEM, "tools": self.tool_specs(),
                "turns": [{"user": t.user, "calls": [[{"name": c.name, "arguments": c.arguments} for c in r]
                                                     for r in t.rounds],
                           "answer": t.answer, "expect": asdict(t.expect)} for t in self.turns],
                "final_state": self.state}


def train_episode(kind: str, specs: list[dict], turns: list[Turn]) -> Episode:
    """A train episode declaring `specs` in order; the invented ones (not in tools.TOOLS) travel in `Episode.specs`."""
    names = [s["function"]["name"] for s in specs]
    return Episode(kind, "train", names, turns, {}, specs={n: s for n, s in zip(names, specs, strict=True)
                                                           if n not in TOOLS})


def fmt(x: float) -> str:
    """Numbers as the answers write them: no exponent, no trailing zeros."""
    return str(int(x)) if float(x) == int(x) else format(Decimal(repr(float(x))), "f")


class Gen:
    """One episode's random source, split and tool environment; builders draw values only through it."""

    def __init__(self, rng: random.Random, split: Split):
        self.rng, self.split, self.env = rng, split, ToolEnv()

    def phrase(self, key: str, **values) -> tuple[str, str]:
        template = self.rng.choice(USER[key][self.split])
        return template.format(**values), template

    def call(self, name: str, **arguments) -> Call:
        return Call(name, arguments, self.env.call(name, arguments))

    def city(self, exclude: tuple = ()) -> str:
        pool = world.TRAIN_CITIES if self.split == "train" else world.HELDOUT_CITIES
        return self.rng.choice([c.name for c in pool if c.name not in exclude])

    def date(self) -> str:
        year = 2025 if self.split == "train" else 2027
        return (dt.date(year, 1, 1) + dt.timedelta(days=self.rng.randrange(365))).isoformat()


# ---- single tool scenarios: (gen) -> (user text, template, calls, answer, expect) ----------------------------------

Single = tuple[str, str, list[Call], str, Expect]


def weather(g: Gen) -> Single:
    city = g.city()
    if g.rng.random() < 0.3:
        c = g.call("get_weather", city=city, unit="fahrenheit")
        user, t = g.phrase("weather_f", city=city)
    else:
        c = g.call("get_weather", city=city)
        user, t = g.phrase("weather", city=city)
    r = c.result
    sym = "°C" if r["unit"] == "celsius" else "°F"
    answer = f"In {city} it is {fmt(r['temperature'])}{sym} and {r['condition']}, with {r['humidity']}% humidity."
    return user, t, [c], answer, Expect(numbers=[r["temperature"]])


def calc(g: Gen) -> Single:
    nums = [g.rng.randint(7, 400) for _ in range(g.rng.choice([2, 3]))]
    expr = str(nums[0])
    for x in nums[1:]:
        expr += f" {g.rng.choice('+-*')} {x}"
    c = g.call("calculator", expression=expr)
    user, t = g.phrase("calc", expr=expr)
    return user, t, [c], f"{expr} = {fmt(c.result['result'])}.", Expect(numbers=[c.result["result"]])


def units(g: Gen) -> Single:
    dim = g.rng.choice(["length", "mass"])
    a, b = g.rng.sample([u for u, (d, _) in UNITS.items() if d == dim], 2)
    value = g.rng.randint(7, 400)
    c = g.call("convert_units", value=value, from_unit=a, to_unit=b)
    user, t = g.phrase("units", value=value, from_unit=a, to_unit=b, from_name=UNIT_NAMES[a], to_name=UNIT_NAMES[b])
    answer = f"{value} {UNIT_NAMES[a]} is {fmt(c.result['result'])} {UNIT_NAMES[b]}."
    return user, t, [c], answer, Expect(numbers=[c.result["result"]])


def currency(g: Gen) -> Single:
    a, b = g.rng.sample(sorted(world.RATES_PER_USD), 2)
    amount = g.rng.randint(10, 400)
    c = g.call("convert_currency", amount=amount, from_currency=a, to_currency=b)
    user, t = g.phrase("currency", amount=amount, from_currency=a, to_currency=b)
    answer = f"{amount} {a} is about {fmt(c.result['result'])} {b} (at a reference rate of {fmt(c.result['rate'])})."
    return user, t, [c], answer, Expect(numbers=[c.result["result"]])


def timezone(g: Gen) -> Single:
    a = g.city()
    b = g.city(exclude=(a,))
    time = f"{g.rng.randrange(24):02d}:{g.rng.choice([0, 15, 30, 45]):02d}"
    c = g.call("convert_timezone", time=time, from_city=a, to_city=b)
    user, t = g.phrase("timezone", time=time, from_city=a, to_city=b)
    day = {-1: " on the previous day", 0: "", 1: " on the next day"}[c.result["day_offset"]]
    return user, t, [c], f"When it is {time} in {a}, it is {c.result['time']} in {b}{day}.", Expect(
        contains=[c.result["time"]])


def add_days(g: Gen) -> Single:
    date, days = g.date(), g.rng.randint(7, 120)
    c = g.call("add_days", date=date, days=days)
    user, t = g.phrase("add_days", date=date, days=days)
    answer = f"{days} days after {date} is {c.result['weekday']}, {c.result['date']}."
    return user, t, [c], answer, Expect(contains=[c.result["date"]])


def fact(g: Gen) -> Single:
    f = g.rng.choice(world.TRAIN_FACTS)
    c = g.call("search_facts", query=f.title)
    user, t = g.phrase("fact", title=f.title)
    return user, t, [c], f"The {f.title} is {fmt(f.value)} {f.unit}.", Expect(numbers=[f.value])


def forecast(g: Gen) -> Single:
    city, days = g.city(), g.rng.randint(1, 3)
    c = g.call("get_forecast", city=city, days=days)
    user, t = g.phrase("forecast", city=city, days=days)
    highs = [d["high_c"] for d in c.result["forecast"]]
    answer = f"Expected highs in {city}: " + ", ".join(f"day {i + 1}: {fmt(h)}°C" for i, h in enumerate(highs)) + "."
    return user, t, [c], answer, Expect(numbers=highs)


def temperature(g: Gen) -> Single:
    a, b = g.rng.sample(["celsius", "fahrenheit", "kelvin"], 2)
    tenths = g.rng.randint(-300, 900) if a != "kelvin" else g.rng.randint(2000, 4000)
    value = (tenths + (5 if tenths % 10 == 0 else 0)) / 10  # a non-integer, so never a train value
    c = g.call("convert_temperature", value=value, from_scale=a, to_scale=b)
    user, t = g.phrase("temperature", value=fmt(value), from_scale=a, to_scale=b)
    return user, t, [c], f"{fmt(value)} degrees {a} is {fmt(c.result['result'])} degrees {b}.", Expect(
        numbers=[c.result["result"]])


def days_between(g: Gen) -> Single:
    a, b = sorted([g.date(), g.date()])
    c = g.call("days_between", start_date=a, end_date=b)
    user, t = g.phrase("days_between", start_date=a, end_date=b)
    return user, t, [c], f"There are {c.result['days']} days from {a} to {b}.", Expect(numbers=[c.result["days"]])


def element(g: Gen) -> Single:
    e = g.rng.choice(world.HELDOUT_ELEMENTS)
    c = g.call("lookup_element", symbol=e.symbol)
    user, t = g.phrase("element", symbol=e.symbol)
    answer = f"{e.symbol} is {e.name}, with atomic number {e.atomic_number} (atomic mass {fmt(e.atomic_mass)})."
    return user, t, [c], answer, Expect(numbers=[e.atomic_number], contains=[e.name])


def distance(g: Gen) -> Single:
    a = g.city()
    b = g.city(exclude=(a,))
    c = g.call("city_distance", from_city=a, to_city=b)
    user, t = g.phrase("distance", from_city=a, to_city=b)
    return user, t, [c], f"{a} and {b} are about {c.result['km']} km apart.", Expect(numbers=[c.result["km"]])


def split_bill(g: Gen) -> Single:
    total = round(g.rng.randint(20, 400) + g.rng.randint(1, 99) / 100, 2)
    people, tip = g.rng.randint(2, 6), g.rng.choice([12.5, 17.5, 22.5])
    c = g.call("split_bill", total=total, people=people, tip_percent=tip)
    user, t = g.phrase("split_bill", total=fmt(total), people=people, tip_percent=fmt(tip))
    answer = (f"With a {fmt(tip)}% tip the bill is {fmt(c.result['total_with_tip'])} dollars, so each of the "
              f"{people} people pays {fmt(c.result['per_person'])} dollars.")
    return user, t, [c], answer, Expect(numbers=[c.result["per_person"]])


SINGLES: dict[Split, list[Callable[[Gen], Single]]] = {
    "train": [weather, calc, units, currency, timezone, add_days, fact],
    "heldout": [forecast, temperature, days_between, element, distance, split_bill],
}


# ---- episode builders ------------------------------------------------------------------------------------------


def _single(g: Gen) -> list[Turn]:
    user, t, calls, answer, expect = g.rng.choice(SINGLES[g.split])(g)
    return [Turn(user, [calls], answer, expect, [t])]


def _parallel(g: Gen) -> list[Turn]:
    first, second = g.rng.sample(SINGLES[g.split], 2)
    u1, t1, c1, a1, e1 = first(g)
    u2, t2, c2, a2, e2 = second(g)
    connect = g.rng.choice(CONNECT[g.split])
    u2 = u2 if u2.startswith(("I ", "I'")) else u2[0].lower() + u2[1:]
    expect = Expect(numbers=e1.numbers + e2.numbers, contains=e1.contains + e2.contains)
    return [Turn(connect.format(a=u1, b=u2), [c1 + c2], f"{a1} {a2}", expect, [connect, t1, t2])]


def _sequential(g: Gen) -> list[Turn]:
    if g.split == "train" and g.rng.random() < 0.5:
        f = g.rng.choice(world.TRAIN_FACTS)
        to = {"m": "ft", "km": "mi"}[f.unit]
        c1 = g.call("search_facts", query=f.title)
        c2 = g.call("convert_units", value=f.value, from_unit=f.unit, to_unit=to)
        user, t = g.phrase("fact_convert", title=f.title, to_name=UNIT_NAMES[to])
        answer = f"The {f.title} is {fmt(f.value)} {f.unit}, which is {fmt(c2.result['result'])} {UNIT_NAMES[to]}."
        return [Turn(user, [[c1], [c2]], answer, Expect(numbers=[c2.result["result"]]), [t])]
    if g.split == "train":
        a, b = g.rng.sample(sorted(world.RATES_PER_USD), 2)
        amount, k = g.rng.randint(10, 400), g.rng.randint(2, 6)
        c1 = g.call("convert_currency", amount=amount, from_currency=a, to_currency=b)
        c2 = g.call("calculator", expression=f"{fmt(c1.result['result'])} / {k}")
        user, t = g.phrase("currency_split", amount=amount, from_currency=a, to_currency=b, k=k)
        answer = (f"{amount} {a} is {fmt(c1.result['result'])} {b}; split {k} ways, each person gets "
                  f"{fmt(c2.result['result'])} {b}.")
        return [Turn(user, [[c1], [c2]], answer, Expect(numbers=[c2.result["result"]]), [t])]
    city = g.city()
    c1 = g.call("get_forecast", city=city, days=1)
    high = c1.result["forecast"][0]["high_c"]
    c2 = g.call("convert_temperature", value=high, from_scale="celsius", to_scale="fahrenheit")
    user, t = g.phrase("forecast_f", city=city)
    answer = f"Tomorrow's high in {city} is {fmt(high)}°C, which is {fmt(c2.result['result'])}°F."
    return [Turn(user, [[c1], [c2]], answer, Expect(numbers=[c2.result["result"]]), [t])]


def _multi_turn(g: Gen) -> list[Turn]:
    turns = []
    if g.split == "train":
        titles = g.rng.sample(world.TRAIN_TODOS, g.rng.randint(1, 2))
        for title in titles:
            c = g.call("add_task", title=title)
            user, t = g.phrase("todo_add", title=title)
            turns.append(Turn(user, [[c]], f"Done: '{title}' is now task {c.result['id']} on your to-do list.",
                              Expect(contains=[title]), [t]))
        c = g.call("list_tasks")
        user, t = g.phrase("todo_list")
        listing = "; ".join(f"{x['id']}. {x['title']}" for x in c.result["tasks"])
        turns.append(Turn(user, [[c]], f"Your to-do list: {listing}.", Expect(contains=titles), [t]))
        return turns
    for item in g.rng.sample(sorted(world.HELDOUT_CATALOG), g.rng.randint(1, 2)):
        quantity = g.rng.randint(1, 6)
        c = g.call("add_to_cart", item=item, quantity=quantity)
        user, t = g.phrase("cart_add", item=item, quantity=quantity)
        turns.append(Turn(user, [[c]], f"Added {quantity} x {item} at {fmt(c.result['unit_price'])} dollars each.",
                          Expect(contains=[item]), [t]))
    c = g.call("view_cart")
    user, t = g.phrase("cart_total")
    lines = ", ".join(f"{x['quantity']} x {x['item']} ({fmt(x['subtotal'])})" for x in c.result["items"])
    turns.append(Turn(user, [[c]], f"Your cart: {lines}. Total: {fmt(c.result['total'])} dollars.",
                      Expect(numbers=[c.result["total"]]), [t]))
    return turns


REFUSAL = ("I'm sorry, but I can't do that: none of the tools available to me here can carry out that request. "
           "I can help with what my tools cover instead.")


def _refusal(g: Gen) -> list[Turn]:
    user, t = g.phrase("refusal")
    return [Turn(user, [], REFUSAL, Expect(refusal=True), [t])]


IDENTITY = ["I'm Kimi, an AI assistant created by Moonshot AI. I can answer questions, do calculations and use "
            "tools when they are available.",
            "My name is Kimi. I'm an AI assistant made by Moonshot AI, here to help with questions and tasks.",
            "I am Kimi, an AI assistant built by Moonshot AI. How can I help you today?"]


def _identity(g: Gen) -> list[Turn]:
    user, t = g.phrase("identity")
    return [Turn(user, [], g.rng.choice(IDENTITY), Expect(contains=["Kimi", "Moonshot AI"]), [t])]


def _arithmetic(g: Gen) -> list[Turn]:
    lo, hi = (7, 99) if g.split == "train" else (101, 999)
    a, b = sorted([g.rng.randint(lo, hi), g.rng.randint(lo, hi)], reverse=True)
    op = g.rng.choice(["add", "sub", "mul"])
    r, sym = {"add": (a + b, "+"), "sub": (a - b, "-"), "mul": (a * b, "×")}[op]
    user, t = g.phrase(f"arith_{op}", a=a, b=b)
    return [Turn(user, [], f"{a} {sym} {b} = {r}.", Expect(exact=str(r)), [t])]


def _fact(g: Gen) -> list[Turn]:
    capitals = world.TRAIN_CAPITALS if g.split == "train" else world.HELDOUT_CAPITALS
    country = g.rng.choice(sorted(capitals))
    user, t = g.phrase("capital", country=country)
    return [Turn(user, [], f"The capital of {country} is {capitals[country]}.", Expect(exact=capitals[country]), [t])]


BUILDERS = {"single": _single, "parallel": _parallel, "sequential": _sequential, "multi_turn": _multi_turn,
            "refusal": _refusal, "identity": _identity, "arithmetic": _arithmetic, "fact": _fact}


def episode(seed: int, split: Split, index: int, kind: str | None = None) -> Episode:
    """Episode `index` of (`seed`, `split`); `kind` forces the scenario, otherwise it is drawn with WEIGHTS."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if kind is not None and kind not in BUILDERS:
        raise ValueError(f"unknown episode kind {kind!r}; choose from {KINDS}")
    rng = random.Random(f"{seed}/{split}/{index}/{kind}")
    kind = kind or rng.choices(KINDS, WEIGHTS)[0]
    g = Gen(rng, split)
    turns = BUILDERS[kind](g)
    used = list(dict.fromkeys(c.name for t in turns for r in t.rounds for c in r))
    # offer the needed tools plus distractors (refusals: only tools that cannot serve the request)
    others = [t.name for t in tools_of(split) if t.name not in used]
    n_extra = g.rng.randint(2, 4) if kind == "refusal" else g.rng.randint(0 if kind in CHAT_KINDS else 1, 3)
    offered = used + g.rng.sample(others, n_extra)
    g.rng.shuffle(offered)
    return Episode(kind, split, offered, turns, g.env.state)


def episodes(seed: int, split: Split, n: int) -> Iterator[Episode]:
    for i in range(n):
        yield episode(seed, split, i)
