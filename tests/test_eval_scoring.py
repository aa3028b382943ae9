import json

import pytest

from kimi_k2.eval import scoring
from kimi_k2.eval.benchmarks import load_tasks
from kimi_k2.eval.runner import summarize
from kimi_k2.eval.tools import ToolEnv

OFFERED = {"get_weather", "convert_units"}
WEATHER = {"name": "get_weather", "arguments": {"city": "Oslo"}}


def test_numbers_and_exact_match():
    assert scoring.numbers("It is -3.5°C, 1,250 m and 2027-01-05") == [-3.5, 1250, 2027, -1, -5]
    assert scoring.exact_match("37 × 12 = 444.", "444")
    assert not scoring.exact_match("444 is close to 445", "444")  # the final number counts
    assert scoring.exact_match("The capital of Peru is Lima.", "Lima")
    assert not scoring.exact_match("Lima is not the capital of Peru.", "Lima")
    assert not scoring.exact_match("", "Lima")


@pytest.mark.parametrize("answer,expect,calls,ok", [
    ("It is 12.35 degrees.", {"numbers": [12.3456]}, 0, True),
    ("It is 12.3 degrees.", {"numbers": [12.3456]}, 0, False),
    ("Added 2 pens.", {"contains": ["pen"]}, 0, False),  # whole words only
    ("Added the pen.", {"contains": ["pen"]}, 0, True),
    ("I can’t do that with my tools.", {"refusal": True}, 0, True),
    ("I can't do that.", {"refusal": True}, 1, False),  # a refusal makes no call
    ("Sure, done!", {"refusal": True}, 0, False),
    ("I'm Kimi, made by Moonshot AI.", {"contains": ["Kimi", "Moonshot AI"]}, 0, True),
])
def test_answer_ok(answer, expect, calls, ok):
    assert scoring.answer_ok(answer, expect, calls) is ok


def test_score_turn_tool_accuracy():
    exp = {"numbers": []}
    right = scoring.score_turn([("get_weather", json.dumps({"city": " oslo", "unit": "celsius"}))], "", [WEATHER],
                               exp, OFFERED)
    assert (right.tool_name, right.calls_valid, right.args_correct, right.success) == (True, 1, True, True)
    wrong_arg = scoring.score_turn([("get_weather", '{"city": "Bergen"}')], "", [WEATHER], exp, OFFERED)
    assert (wrong_arg.tool_name, wrong_arg.calls_valid, wrong_arg.args_correct) == (True, 1, False)
    bad_json = scoring.score_turn([("get_weather", '{"city": ')], "", [WEATHER], exp, OFFERED)
    assert (bad_json.tool_name, bad_json.calls_valid, bad_json.args_correct) == (True, 0, False)
    schema_bad = scoring.score_turn([("get_weather", '{"town": "Oslo"}')], "", [WEATHER], exp, OFFERED)
    assert schema_bad.calls_valid == 0
    not_offered = scoring.score_turn([("calculator", '{"expression": "1+1"}')], "", [], exp, OFFERED)
    assert (not_offered.tool_name, not_offered.calls_valid, not_offered.args_correct) == (False, 0, False)
    extra = scoring.score_turn([("get_weather", '{"city": "Oslo"}')] * 2, "", [WEATHER], exp, OFFERED)
    assert not extra.tool_name and not extra.args_correct
    # parallel calls: order does not matter
    conv = {"name": "convert_units", "arguments": {"value": 7, "from_unit": "m", "to_unit": "ft"}}
    made = [("convert_units", '{"to_unit": "ft", "value": 7.0, "from_unit": "m"}'), ("get_weather", '{"city":"Oslo"}')]
    assert scoring.score_turn(made, "", [WEATHER, conv], exp, OFFERED).args_correct
    # an integer beyond float range is scored as wrong, not a crash of the whole eval
    huge = [("convert_units", json.dumps({"value": 10**400, "from_unit": "m", "to_unit": "ft"}))]
    assert not scoring.score_turn(huge, "", [conv], exp, OFFERED).args_correct


def _record(task, kind, sample, success, turns):
    return {"task_id": task, "kind": kind, "sample": sample, "success": success, "error": None, "state_ok": success,
            "turns": [{"tool_name": t, "calls_made": 1, "calls_valid": int(t), "args_correct": t, "answer_ok": True}
                      for t in turns]}


def test_summarize_is_avg_at_k():
    records = [_record("a", "single", 0, True, [True]), _record("a", "single", 1, False, [False]),
               _record("b", "single", 0, True, [True]), _record("b", "single", 1, True, [True]),
               _record("c", "multi_turn", 0, False, [True, False]), _record("c", "multi_turn", 1, False, [True, False])]
    s = summarize(records)
    assert s["all"]["avg@k"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert s["all"]["pass^k"] == pytest.approx(1 / 3) and s["single"]["pass^k"] == 0.5
    assert s["single"]["avg@k"] == 0.75 and s["multi_turn"]["avg@k"] == 0
    assert s["multi_turn"]["tool_name"] == 0.5 and s["all"]["args_valid"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert s["all"]["n_tasks"] == 3 and s["all"]["k"] == 2


@pytest.mark.parametrize("name", ["tool_use", "chat"])
def test_shipped_reference_episodes_score_right(name):
    """Replaying each task's reference calls and answers through its tools scores every turn right and reaches the
    task's final state, so a perfect model can reach 100%."""
    _, tasks = load_tasks(name)
    assert len({t["id"] for t in tasks}) == len({t["turns"][0]["user"] for t in tasks}) == len(tasks) >= 50
    for task in tasks:
        offered = {t["function"]["name"] for t in task["tools"]}
        env = ToolEnv(sorted(offered))
        for turn in task["turns"]:
            made = [(c["name"], json.dumps(c["arguments"])) for r in turn["calls"] for c in r]
            for n, a in made:
                env.call(n, a)
            expected = [c for r in turn["calls"] for c in r]
            assert scoring.score_turn(made, turn["answer"], expected, turn["expect"], offered).success, task["id"]
            assert not scoring.score_turn(made, "", expected, turn["expect"], offered).success, task["id"]
        assert env.state == task["final_state"]
