import json
import re

import pytest

from kimi_k2.cli.data import TASKS_DIR, write_benchmarks
from kimi_k2.data import schema as js
from kimi_k2.data import synthetic
from kimi_k2.data.tools import TOOLS, ToolEnv

N_TRAIN, N_HELDOUT = 1500, 600


@pytest.fixture(scope="module")
def train():
    return list(synthetic.episodes(11, "train", N_TRAIN))


@pytest.fixture(scope="module")
def heldout():
    return list(synthetic.episodes(11, "heldout", N_HELDOUT))


def test_deterministic_given_seed():
    a = [e.conversation() for e in synthetic.episodes(3, "train", 200)]
    b = [e.conversation() for e in synthetic.episodes(3, "train", 200)]
    c = [e.conversation() for e in synthetic.episodes(4, "train", 200)]
    assert json.dumps(a) == json.dumps(b)
    assert json.dumps(a) != json.dumps(c)
    # episode i does not depend on how many are drawn
    assert synthetic.episode(3, "train", 150).conversation() == a[150]


def test_every_kind_in_both_splits(train, heldout):
    for eps in (train, heldout):
        assert {e.kind for e in eps} == set(synthetic.KINDS)


def test_heldout_disjoint_from_train(train, heldout):
    synthetic.check_heldout(train, heldout)
    fp_train = [synthetic.footprint(e) for e in train]
    fp_held = [synthetic.footprint(e) for e in heldout]
    for key in ("tools", "values", "templates", "messages"):
        seen = set().union(*(f[key] for f in fp_train))
        held = set().union(*(f[key] for f in fp_held))
        assert held and seen and not held & seen, key
    # the held-out split is no subset: it has its own tools, and every offered tool is of its split
    assert {TOOLS[t].split for e in heldout for t in e.tools} == {"heldout"}
    assert {TOOLS[t].split for e in train for t in e.tools} == {"train"}


def test_heldout_words_never_appear_in_train(train, heldout):
    """No held-out string argument (city, date, item, ...) occurs as a word anywhere in a train conversation."""
    text = " ".join(json.dumps(e.conversation()) for e in train).lower()
    words = {json.loads(v) for e in heldout for v in synthetic.footprint(e)["values"] if v.startswith('"')}
    words = {w for w in words if len(w) >= 4}
    assert len(words) > 30
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b")
    assert sorted(set(pattern.findall(text))) == []


def test_check_heldout_can_fail(train):
    leaked = synthetic.episode(11, "train", 5)  # a train episode posing as held-out
    with pytest.raises(ValueError, match="shares"):
        synthetic.check_heldout(train, [leaked])


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
        assert msgs[0] == {"role": "system", "content": synthetic.SYSTEM}
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
    for e in (train + heldout)[:800]:
        conv = e.conversation()
        env = ToolEnv([t["function"]["name"] for t in conv["tools"]])
        results = {m["tool_call_id"]: m["content"] for m in conv["messages"] if m["role"] == "tool"}
        for call in _tool_calls(conv):
            assert json.dumps(env.call(call["function"]["name"], call["function"]["arguments"])) == results[call["id"]]


def test_final_answers_use_results(train, heldout):
    """The answer that closes a tool turn quotes the numbers or strings that the expectation asks for."""
    from kimi_k2.eval.scoring import answer_ok

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
        elif e.kind in ("refusal", *synthetic.CHAT_KINDS):
            assert rounds == []
        elif e.kind == "multi_turn":
            assert len(e.turns) >= 2


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        synthetic.episode(0, "test", 0)
    with pytest.raises(ValueError, match="kind"):
        synthetic.episode(0, "train", 0, kind="poetry")


def test_shipped_benchmarks_match_generator(tmp_path):
    counts = write_benchmarks(tmp_path)
    for name, (_, per_kind) in synthetic.BENCHMARKS.items():
        assert counts[name] == sum(per_kind.values())
        assert (tmp_path / f"{name}.jsonl").read_text() == (TASKS_DIR / f"{name}.jsonl").read_text(), (
            f"kimi_k2/eval/tasks/{name}.jsonl is stale: run `kimi-k2 data tasks`")


def test_cli_synth(tmp_path):
    from kimi_k2.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "40", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len(held) == 4
    assert rows == [e.conversation() for e in synthetic.episodes(5, "train", 40)]


@pytest.mark.slow
def test_heldout_disjoint_at_scale():
    train = list(synthetic.episodes(0, "train", 20000))
    heldout = list(synthetic.episodes(0, "heldout", 5000))
    synthetic.check_heldout(train, heldout)
