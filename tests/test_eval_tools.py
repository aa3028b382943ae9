import json

import pytest

from kimi_k2.eval import schema as js
from kimi_k2.eval.tools import TOOLS, ToolEnv, ToolError, tools_of

# one valid call per tool (every tool must appear here, checked below)
CALLS = {
    "get_weather": {"city": "Oslo"},
    "calculator": {"expression": "(3 + 4) * 2 ** 3 - 10 / 4"},
    "convert_units": {"value": 1, "from_unit": "mi", "to_unit": "km"},
    "convert_currency": {"amount": 100, "from_currency": "EUR", "to_currency": "EUR"},
    "convert_timezone": {"time": "23:30", "from_city": "London", "to_city": "Tokyo"},
    "add_days": {"date": "2024-02-27", "days": 3},
    "search_facts": {"query": "height of Mount Everest"},
    "add_task": {"title": "buy milk"},
    "list_tasks": {},
    "get_forecast": {"city": "Lisbon", "days": 3},
    "convert_temperature": {"value": 100, "from_scale": "celsius", "to_scale": "fahrenheit"},
    "days_between": {"start_date": "2027-01-01", "end_date": "2028-01-01"},
    "lookup_element": {"symbol": "Fe"},
    "city_distance": {"from_city": "Lisbon", "to_city": "Lisbon"},
    "split_bill": {"total": 90, "people": 3, "tip_percent": 10},
    "add_to_cart": {"item": "Pen", "quantity": 2},
    "view_cart": {},
}


def test_every_tool_executes_and_is_json():
    assert set(CALLS) == set(TOOLS)
    env = ToolEnv()
    for name, args in CALLS.items():
        assert js.errors(args, TOOLS[name].parameters) == []
        result = env.call(name, json.dumps(args))
        assert isinstance(result, dict) and json.loads(json.dumps(result)) == result
        spec = TOOLS[name].spec()
        assert spec["type"] == "function" and spec["function"]["name"] == name


def test_tool_results_are_right():
    env = ToolEnv()
    assert env.call("calculator", CALLS["calculator"])["result"] == (3 + 4) * 2**3 - 10 / 4
    assert env.call("convert_units", CALLS["convert_units"])["result"] == 1.609  # 1 mile = 1.609344 km
    assert env.call("convert_units", {"value": 7, "from_unit": "mm", "to_unit": "mi"})["result"] == 4.35e-06
    assert env.call("convert_currency", CALLS["convert_currency"])["result"] == 100
    assert env.call("convert_timezone", CALLS["convert_timezone"]) == {
        "from_city": "London", "to_city": "Tokyo", "time": "08:30", "day_offset": 1}
    assert env.call("add_days", CALLS["add_days"]) == {"date": "2024-03-01", "weekday": "Friday"}  # leap year
    assert env.call("search_facts", CALLS["search_facts"])["results"][0]["title"] == "height of Mount Everest"
    assert env.call("convert_temperature", CALLS["convert_temperature"])["result"] == 212
    assert env.call("convert_temperature", {"value": -40, "from_scale": "fahrenheit", "to_scale": "celsius"})[
        "result"] == -40
    assert env.call("days_between", CALLS["days_between"])["days"] == 365
    assert env.call("lookup_element", CALLS["lookup_element"])["atomic_number"] == 26
    assert env.call("city_distance", CALLS["city_distance"])["km"] == 0
    assert env.call("split_bill", CALLS["split_bill"]) == {"total_with_tip": 99, "per_person": 33}
    forecast = env.call("get_forecast", CALLS["get_forecast"])["forecast"]
    assert [d["day"] for d in forecast] == [1, 2, 3] and all(d["high_c"] != int(d["high_c"]) for d in forecast)
    w = env.call("get_weather", {"city": "oslo", "unit": "fahrenheit"})
    assert w["temperature"] == round(env.call("get_weather", {"city": "Oslo"})["temperature"] * 9 / 5 + 32, 1)


def test_city_distance_symmetric_and_plausible():
    env = ToolEnv()
    ab = env.call("city_distance", {"from_city": "Lisbon", "to_city": "Auckland"})["km"]
    ba = env.call("city_distance", {"from_city": "Auckland", "to_city": "Lisbon"})["km"]
    assert ab == ba and 19000 < ab < 20016  # near antipodes; half the Earth's circumference is 20015 km


def test_state_is_per_environment():
    a, b = ToolEnv(), ToolEnv()
    a.call("add_task", {"title": "one"})
    a.call("add_task", {"title": "two"})
    b.call("add_task", {"title": "other"})
    assert [t["title"] for t in a.call("list_tasks", {})["tasks"]] == ["one", "two"]
    assert [t["id"] for t in b.call("list_tasks", {})["tasks"]] == [1]
    a.call("add_to_cart", {"item": "pen", "quantity": 2})
    a.call("add_to_cart", {"item": "notebook", "quantity": 1})
    a.call("add_to_cart", {"item": "pen", "quantity": 1})
    assert a.call("view_cart", {})["total"] == 3 * 1.25 + 3.5


@pytest.mark.parametrize("name,args,match", [
    ("get_weather", {"city": "Atlantis"}, "unknown city 'Atlantis'"),
    ("get_weather", {"city": "Oslo", "unit": "kelvin"}, "unit"),
    ("get_weather", {}, "missing required 'city'"),
    ("get_weather", {"city": "Oslo", "country": "NO"}, "unexpected property 'country'"),
    ("convert_units", {"value": "ten", "from_unit": "m", "to_unit": "ft"}, "expected number"),
    ("convert_units", {"value": 1, "from_unit": "kg", "to_unit": "m"}, "cannot convert mass"),
    ("convert_currency", {"amount": 1, "from_currency": "usd", "to_currency": "EUR"}, "does not match"),
    ("convert_currency", {"amount": 1, "from_currency": "XYZ", "to_currency": "EUR"}, "unknown currency 'XYZ'"),
    ("calculator", {"expression": "__import__('os')"}, "unsupported expression"),
    ("calculator", {"expression": "1/0"}, "division by zero"),
    ("add_days", {"date": "2025-02-30", "days": 7}, "not a YYYY-MM-DD date"),
    ("get_forecast", {"city": "Lima", "days": 9}, "maximum"),
    ("convert_temperature", {"value": -500, "from_scale": "celsius", "to_scale": "kelvin"}, "absolute zero"),
    ("lookup_element", {"symbol": "Xx"}, "unknown element symbol 'Xx'"),
    ("add_to_cart", {"item": "piano", "quantity": 1}, "'piano' is not in the catalog"),
    ("add_to_cart", {"item": "pen", "quantity": True}, "expected integer"),
    ("teleport", {}, "unknown tool 'teleport'"),
])
def test_bad_calls_raise_tool_error(name, args, match):
    with pytest.raises(ToolError, match=match):
        ToolEnv().call(name, args)


def test_env_limits_to_offered_tools_and_parses_json():
    env = ToolEnv(["calculator"])
    with pytest.raises(ToolError, match="unknown tool 'get_weather'"):
        env.call("get_weather", {"city": "Oslo"})
    with pytest.raises(ToolError, match="not valid JSON"):
        env.call("calculator", '{"expression": "1+')
    with pytest.raises(ToolError, match="expected object"):
        env.call("calculator", "[1, 2]")
    with pytest.raises(ValueError, match="unknown tools"):
        ToolEnv(["nope"])


def test_schema_checker_rejects_unsupported_keywords():
    with pytest.raises(ValueError, match="unsupported schema keywords"):
        js.errors({}, {"type": "object", "oneOf": []})
    assert js.errors([1, "a"], {"type": "array", "items": {"type": "integer"}}) == ["$[1]: expected integer, got str"]


def test_splits_partition_tools():
    train, held = {t.name for t in tools_of("train")}, {t.name for t in tools_of("heldout")}
    assert train and held and not train & held and train | held == set(TOOLS)
