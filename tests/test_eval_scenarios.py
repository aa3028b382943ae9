"""The reference episodes over the executable tools (kimi_k2/eval/scenarios.py) and the benchmarks drawn from them."""

import json
import re

import pytest

from kimi_k2.eval import scenarios
from kimi_k2.eval import schema as js
from kimi_k2.eval.benchmarks import BENCHMARKS, TASKS_DIR, benchmark_tasks, write_benchmarks
from kimi_k2.eval.scoring import answer_ok
from kimi_k2.eval.tools import TOOLS, ToolEnv

N_TRAIN, N_HELDOUT = 800, 400


@pytest.fixture(scope="module")
def train():
    return list(scenarios.episodes(11, "train", N_TRAIN))


@pytest.fixture(scope="module")
def heldout():
    return list(scenarios.episodes(11, "heldout", N_HELDOUT))


def test_deterministic_given_seed():
    a = [e.conversation() for e in scenarios.episodes(3, "train", 200)]
    b = [e.conversation() for e in scenarios.episodes(3, "train", 200)]
    c = [e.conversation() for e in scenarios.episodes(4, "train", 200)]
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)
    # episode i does not depend on how many are drawn
    assert scenarios.episode(3, "train", 150).conversation() == a[150]


def test_every_kind_in_both_splits_and_tools_of_their_split(train, heldout):
    for split, eps in (("train", train), ("heldout", heldout)):
        assert {e.kind for e in eps} == set(scenarios.KINDS)
        assert {TOOLS[t].split for e in eps for t in e.tools} == {split}


def _tool_calls(conv):
    for m in conv["messages"]:
        yield from m.get("tool_calls") or []


def test_tool_calls_valid_against_schema(train, heldout):
    n = 0
    for e in train + heldout:
        conv = e.conversation()
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in conv["tools"]}
        for call in _tool_calls(conv):
            args = json.loads(call["function"]["arguments"])
            assert js.errors(args, offered[call["function"]["name"]]) == []
            n += 1
    assert n > N_TRAIN  # plenty of calls were checked


def test_conversation_format(train, heldout):
    for e in train + heldout:
        conv = e.conversation()
        msgs = conv["messages"]
        assert msgs[0] == {"role": "system", "content": scenarios.SYSTEM}
        assert msgs[1]["role"] == "user" and msgs[-1]["role"] == "assistant" and msgs[-1]["content"]
        assert {t["type"] for t in conv["tools"]} <= {"function"}
        n, pending = 0, []
        for prev, m in zip(msgs, msgs[1:], strict=False):
            assert m["role"] in ("user", "assistant", "tool")
            if m["role"] == "tool":
                assert pending and m["tool_call_id"] == pending.pop(0)
                assert m["name"] == m["tool_call_id"].split(".")[1].split(":")[0]
                json.loads(m["content"])
            else:
                assert not pending, "every tool call gets its result before the next message"
            if m["role"] == "user":
                assert prev["role"] in ("system", "assistant")
            if m.get("tool_calls"):
                assert m["content"] is None
                for c in m["tool_calls"]:
                    name = c["function"]["name"]
                    assert c["type"] == "function" and c["id"] == f"functions.{name}:{n}"
                    assert re.fullmatch(r"functions\.\w+:\d+", c["id"])
                    pending.append(c["id"])
                    n += 1
        assert not pending


def test_tool_results_replay(train, heldout):
    """Running the calls of a conversation through a fresh environment reproduces every tool message."""
    for e in (train + heldout)[:600]:
        conv = e.conversation()
        env = ToolEnv([t["function"]["name"] for t in conv["tools"]])
        results = {m["tool_call_id"]: m["content"] for m in conv["messages"] if m["role"] == "tool"}
        for call in _tool_calls(conv):
            assert json.dumps(env.call(call["function"]["name"], call["function"]["arguments"])) == results[call["id"]]


def test_final_answers_use_results(train, heldout):
    """The answer that closes a tool turn quotes the numbers or strings that the expectation asks for."""
    for e in train + heldout:
        for t in e.turns:
            assert answer_ok(t.answer, vars(t.expect), sum(len(r) for r in t.rounds)), (e.kind, t.answer)
            if t.rounds and e.kind != "multi_turn":
                assert t.expect.numbers or t.expect.contains


def test_parallel_and_sequential_shapes(train):
    for e in train:
        rounds = [r for t in e.turns for r in t.rounds]
        if e.kind == "parallel":
            assert len(rounds) == 1 and len(rounds[0]) == 2
        elif e.kind == "sequential":
            assert [len(r) for r in rounds] == [1, 1]
        elif e.kind in ("refusal", *scenarios.CHAT_KINDS):
            assert rounds == []
        elif e.kind == "multi_turn":
            assert len(e.turns) >= 2


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        scenarios.episode(0, "test", 0)
    with pytest.raises(ValueError, match="kind"):
        scenarios.episode(0, "train", 0, kind="poetry")
    with pytest.raises(ValueError, match="no benchmark 'poetry'"):
        benchmark_tasks("poetry")


def test_shipped_benchmarks_match_generator(tmp_path):
    counts = write_benchmarks(tmp_path)
    for name, (_, per_kind) in BENCHMARKS.items():
        assert counts[name] == sum(per_kind.values())
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (TASKS_DIR / f"{name}.jsonl").read_bytes(), (
            f"kimi_k2/eval/tasks/{name}.jsonl is stale: run `kimi-k2 data tasks`")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "tool_use.jsonl"]  # no temporary files left


def test_cli_tasks_writes_the_benchmarks(tmp_path, capsys):
    from kimi_k2.cli import main

    assert main(["data", "tasks", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "chat.jsonl").read_bytes() == (TASKS_DIR / "chat.jsonl").read_bytes()
    assert f"wrote 100 tasks to {tmp_path / 'tool_use'}.jsonl" in capsys.readouterr().out

