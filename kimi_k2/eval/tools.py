"""Executable tool environments: an OpenAI function schema plus a Python function per tool.

A tool function takes the episode's mutable `state` dict and the validated arguments and returns a JSON-able dict, the
tool result. `ToolEnv` holds one episode's state; the reference episodes (scenarios.py) and the eval harness both run
tools through it, so a benchmark episode sees exactly the results the reference conversation saw. Each tool belongs to
one split: the train tools are what training data may use, the held-out tools are the benchmarks'.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from kimi_k2.eval import schema as js
from kimi_k2.eval.world import CITIES, ELEMENTS, HELDOUT_CATALOG, RATES_PER_USD, TRAIN_FACTS

Split = Literal["train", "heldout"]


class ToolError(ValueError):
    """A tool call that cannot run: unknown tool, arguments that break the schema, or values the tool rejects."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[..., dict]
    split: Split

    def spec(self) -> dict:
        """The OpenAI `tools` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


_obj = js.object_schema  # short, for the registry below


def _num(x: float, nd: int = 2) -> float | int:
    """Round to `nd` decimals; integral values come back as int so they print without '.0'."""
    x = round(float(x), nd)
    return int(x) if x == int(x) else x


def _sig(x: float) -> float | int:
    """Round to 2 decimals, or to 4 significant digits when that keeps more (0.000435 stays, not 0.0)."""
    return _num(x, max(2, 3 - math.floor(math.log10(abs(x)))) if x else 2)


def stable_hash(*parts: Any) -> int:
    """64 bits of sha256 over the parts, case-insensitive: the simulated data of a tool result, the same everywhere."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).lower().encode()).digest()[:8], "big")


def _city(name: str):
    c = CITIES.get(name.strip().lower())
    if c is None:
        raise ToolError(f"unknown city {name!r}")
    return c


def _date(s: str, arg: str) -> dt.date:
    try:
        return dt.date.fromisoformat(s)
    except ValueError:
        raise ToolError(f"{arg}: {s!r} is not a YYYY-MM-DD date") from None


# ---- train tools -----------------------------------------------------------------------------------------------

CONDITIONS = ["sunny", "partly cloudy", "cloudy", "light rain", "heavy rain", "windy", "foggy", "snow showers"]


def get_weather(state: dict, city: str, unit: str = "celsius") -> dict:
    name = _city(city).name
    h = stable_hash("weather", name)
    temp_c = h % 36 - 5
    temp = temp_c if unit == "celsius" else _num(temp_c * 9 / 5 + 32, 1)
    return {"city": name, "temperature": temp, "unit": unit,
            "condition": CONDITIONS[h // 36 % len(CONDITIONS)], "humidity": 30 + h // 7 % 60}


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Mod: operator.mod, ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(b) > 64:
            raise ToolError("exponent too large")
        if isinstance(node.op, (ast.Div, ast.Mod)) and b == 0:
            raise ToolError("division by zero")
        return _OPS[type(node.op)](a, b)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    raise ToolError(f"unsupported expression element {ast.dump(node)[:40]!r}")


def calculator(state: dict, expression: str) -> dict:
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*").replace("÷", "/"), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse expression {expression!r}") from None
    return {"expression": expression, "result": _num(_eval(tree.body), 4)}


# factor to the base unit (metre, kilogram)
UNITS = {"mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0), "km": ("length", 1000.0),
         "in": ("length", 0.0254), "ft": ("length", 0.3048), "mi": ("length", 1609.344),
         "g": ("mass", 0.001), "kg": ("mass", 1.0), "oz": ("mass", 0.028349523125), "lb": ("mass", 0.45359237)}


def convert_units(state: dict, value: float, from_unit: str, to_unit: str) -> dict:
    (d1, f1), (d2, f2) = UNITS[from_unit], UNITS[to_unit]
    if d1 != d2:
        raise ToolError(f"cannot convert {d1} unit {from_unit!r} to {d2} unit {to_unit!r}")
    return {"value": value, "from_unit": from_unit, "to_unit": to_unit, "result": _sig(value * f1 / f2)}


def convert_currency(state: dict, amount: float, from_currency: str, to_currency: str) -> dict:
    for code in (from_currency, to_currency):
        if code not in RATES_PER_USD:
            raise ToolError(f"unknown currency {code!r}")
    rate = RATES_PER_USD[to_currency] / RATES_PER_USD[from_currency]
    return {"amount": amount, "from_currency": from_currency, "to_currency": to_currency,
            "rate": _num(rate, 6), "result": _sig(amount * rate)}


def convert_timezone(state: dict, time: str, from_city: str, to_city: str) -> dict:
    hh, mm = map(int, time.split(":"))
    if hh > 23 or mm > 59:
        raise ToolError(f"time: {time!r} is not a valid HH:MM time")
    minutes = hh * 60 + mm + round((_city(to_city).utc_offset - _city(from_city).utc_offset) * 60)
    day, minutes = divmod(minutes, 24 * 60)
    return {"from_city": _city(from_city).name, "to_city": _city(to_city).name,
            "time": f"{minutes // 60:02d}:{minutes % 60:02d}", "day_offset": day}


def add_days(state: dict, date: str, days: int) -> dict:
    d = _date(date, "date") + dt.timedelta(days=days)
    return {"date": d.isoformat(), "weekday": d.strftime("%A")}


def search_facts(state: dict, query: str) -> dict:
    words = set(query.lower().replace("?", " ").split()) - {"the", "of", "a", "an", "what", "is", "how"}
    scored = sorted(((len(words & set(f.title.lower().split())), i) for i, f in enumerate(TRAIN_FACTS)), reverse=True)
    hits = [TRAIN_FACTS[i] for s, i in scored[:3] if s > 0]
    return {"results": [{"title": f.title, "value": f.value, "unit": f.unit} for f in hits]}


def add_task(state: dict, title: str) -> dict:
    tasks = state.setdefault("tasks", [])
    tasks.append({"id": len(tasks) + 1, "title": title, "done": False})
    return dict(tasks[-1])


def list_tasks(state: dict) -> dict:
    return {"tasks": [dict(t) for t in state.get("tasks", [])]}


# ---- held-out tools --------------------------------------------------------------------------------------------


def get_forecast(state: dict, city: str, days: int) -> dict:
    out = []
    for day in range(1, days + 1):
        h = stable_hash("forecast", _city(city).name, day)
        tenths = h % 350 - 50
        tenths += 3 if tenths % 10 == 0 else 0  # highs always have a non-zero tenth digit
        out.append({"day": day, "high_c": tenths / 10, "low_c": _num(tenths / 10 - 2 - h // 350 % 60 / 10, 1),
                    "condition": CONDITIONS[h // 21000 % len(CONDITIONS)]})
    return {"city": _city(city).name, "forecast": out}


def convert_temperature(state: dict, value: float, from_scale: str, to_scale: str) -> dict:
    kelvin = {"celsius": value + 273.15, "fahrenheit": (value - 32) * 5 / 9 + 273.15, "kelvin": value}[from_scale]
    if kelvin < 0:
        raise ToolError(f"value: {value} {from_scale} is below absolute zero")
    out = {"celsius": kelvin - 273.15, "fahrenheit": (kelvin - 273.15) * 9 / 5 + 32, "kelvin": kelvin}[to_scale]
    return {"value": value, "from_scale": from_scale, "to_scale": to_scale, "result": _num(out)}


def days_between(state: dict, start_date: str, end_date: str) -> dict:
    return {"days": (_date(end_date, "end_date") - _date(start_date, "start_date")).days}


def lookup_element(state: dict, symbol: str) -> dict:
    e = ELEMENTS.get(symbol.strip())
    if e is None:
        raise ToolError(f"unknown element symbol {symbol!r}")
    return e._asdict()


def city_distance(state: dict, from_city: str, to_city: str) -> dict:
    # great-circle distance, haversine with mean Earth radius 6371 km
    a, b = _city(from_city), _city(to_city)
    p1, p2, dl = math.radians(a.lat), math.radians(b.lat), math.radians(b.lon - a.lon)
    h = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return {"from_city": a.name, "to_city": b.name, "km": round(2 * 6371 * math.asin(math.sqrt(h)))}


def split_bill(state: dict, total: float, people: int, tip_percent: float) -> dict:
    with_tip = total * (1 + tip_percent / 100)
    return {"total_with_tip": _num(with_tip), "per_person": _num(with_tip / people)}


def add_to_cart(state: dict, item: str, quantity: int) -> dict:
    key = item.strip().lower()
    if key not in HELDOUT_CATALOG:
        raise ToolError(f"item {item!r} is not in the catalog")
    cart = state.setdefault("cart", {})
    cart[key] = cart.get(key, 0) + quantity
    return {"item": key, "quantity": cart[key], "unit_price": HELDOUT_CATALOG[key]}


def view_cart(state: dict) -> dict:
    cart = state.get("cart", {})
    items = [{"item": k, "quantity": q, "subtotal": _num(q * HELDOUT_CATALOG[k])} for k, q in sorted(cart.items())]
    return {"items": items, "total": _num(sum(q * HELDOUT_CATALOG[k] for k, q in cart.items()))}


# ---- registry --------------------------------------------------------------------------------------------------

_CITY = {"type": "string", "description": "city name, e.g. a capital"}
_DATE = {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$", "description": "YYYY-MM-DD"}
_CUR = {"type": "string", "pattern": "^[A-Z]{3}$", "description": "ISO 4217 code"}
_UNIT = {"type": "string", "enum": list(UNITS)}
_SCALE = {"type": "string", "enum": ["celsius", "fahrenheit", "kelvin"]}

TOOLS: dict[str, Tool] = {t.name: t for t in [
    Tool("get_weather", "Current weather for a city (simulated data).",
         _obj(["city"], city=_CITY, unit={"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}),
         get_weather, "train"),
    Tool("calculator", "Evaluate an arithmetic expression with + - * / % ** and parentheses.",
         _obj(["expression"], expression={"type": "string"}), calculator, "train"),
    Tool("convert_units", "Convert a length or mass between units.",
         _obj(["value", "from_unit", "to_unit"], value={"type": "number"}, from_unit=_UNIT, to_unit=_UNIT),
         convert_units, "train"),
    Tool("convert_currency", "Convert money between currencies at fixed reference rates (not live).",
         _obj(["amount", "from_currency", "to_currency"], amount={"type": "number", "minimum": 0},
              from_currency=_CUR, to_currency=_CUR), convert_currency, "train"),
    Tool("convert_timezone", "Convert a clock time in one city to the local time in another (standard time, no DST).",
         _obj(["time", "from_city", "to_city"], time={"type": "string", "pattern": r"^\d{2}:\d{2}$"},
              from_city=_CITY, to_city=_CITY), convert_timezone, "train"),
    Tool("add_days", "The date a number of days after (or before, if negative) a given date, with its weekday.",
         _obj(["date", "days"], date=_DATE, days={"type": "integer"}), add_days, "train"),
    Tool("search_facts", "Search a small table of facts about landmarks and geography.",
         _obj(["query"], query={"type": "string"}), search_facts, "train"),
    Tool("add_task", "Add a task to the user's to-do list.", _obj(["title"], title={"type": "string"}), add_task,
         "train"),
    Tool("list_tasks", "List the tasks on the user's to-do list.", _obj([]), list_tasks, "train"),
    Tool("get_forecast", "Daily high/low temperature forecast in Celsius for the next days (simulated data).",
         _obj(["city", "days"], city=_CITY, days={"type": "integer", "minimum": 1, "maximum": 3}), get_forecast,
         "heldout"),
    Tool("convert_temperature", "Convert a temperature between Celsius, Fahrenheit and Kelvin.",
         _obj(["value", "from_scale", "to_scale"], value={"type": "number"}, from_scale=_SCALE, to_scale=_SCALE),
         convert_temperature, "heldout"),
    Tool("days_between", "Number of days from start_date to end_date.",
         _obj(["start_date", "end_date"], start_date=_DATE, end_date=_DATE), days_between, "heldout"),
    Tool("lookup_element", "Look up a chemical element by its symbol.",
         _obj(["symbol"], symbol={"type": "string"}), lookup_element, "heldout"),
    Tool("city_distance", "Great-circle distance between two cities in kilometres.",
         _obj(["from_city", "to_city"], from_city=_CITY, to_city=_CITY), city_distance, "heldout"),
    Tool("split_bill", "Split a bill with a tip between people.",
         _obj(["total", "people", "tip_percent"], total={"type": "number", "minimum": 0},
              people={"type": "integer", "minimum": 1}, tip_percent={"type": "number", "minimum": 0}),
         split_bill, "heldout"),
    Tool("add_to_cart", "Add an item from the shop catalog to the shopping cart.",
         _obj(["item", "quantity"], item={"type": "string"}, quantity={"type": "integer", "minimum": 1}),
         add_to_cart, "heldout"),
    Tool("view_cart", "Show the shopping cart with subtotals and the total in USD (fixed shop prices).", _obj([]),
         view_cart, "heldout"),
]}


def tools_of(split: Split) -> list[Tool]:
    return [t for t in TOOLS.values() if t.split == split]


class ToolEnv:
    """One episode's tool environment: runs calls against the registry and keeps the state between them."""

    def __init__(self, names: list[str] | None = None):
        unknown = [n for n in names or [] if n not in TOOLS]
        if unknown:
            raise ValueError(f"unknown tools {unknown}")
        self.names = list(TOOLS) if names is None else list(names)
        self.state: dict = {}

    def call(self, name: str, arguments: str | dict) -> dict:
        """Run one call; `arguments` is the JSON text (as in a tool call) or the parsed dict. Raises ToolError."""
        if name not in self.names:
            raise ToolError(f"unknown tool {name!r}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ToolError(f"arguments of {name} are not valid JSON: {e}") from None
        tool = TOOLS[name]
        problems = js.errors(arguments, tool.parameters)
        if problems:
            raise ToolError(f"invalid arguments for {name}: " + "; ".join(problems))
        return tool.fn(self.state, **js.with_defaults(arguments, tool.parameters))
