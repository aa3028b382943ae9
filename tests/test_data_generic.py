import json

import pytest
from data_fixtures import heldout_words_in

from kimi_k2.cli.data import train_episodes
from kimi_k2.data import generic, synthetic
from kimi_k2.data import schema as js
from kimi_k2.data.tools import TOOLS
from kimi_k2.eval.scoring import answer_ok


@pytest.fixture(scope="module")
def episodes():
    return [generic.generic_episode(5, i) for i in range(2000)]


def test_deterministic_per_index():
    a = generic.generic_episode(1, 17).conversation()
    assert a == generic.generic_episode(1, 17).conversation()
    assert a != generic.generic_episode(2, 17).conversation()


def test_every_kind_appears_and_calls_fit_the_declared_tools(episodes):
    assert {e.kind for e in episodes} == set(generic.GENERIC_KINDS)
    for e in episodes:
        conv = e.conversation()
        declared = {t["function"]["name"]: t["function"]["parameters"] for t in conv["tools"]}
        assert len(declared) == len(conv["tools"])  # no name declared twice
        for turn in e.turns:
            for calls in turn.rounds:
                for c in calls:
                    assert js.errors(c.arguments, declared[c.name]) == [], (e.kind, c)
            # the final answer quotes what the tools returned (the eval's own check)
            assert answer_ok(turn.answer, {"numbers": turn.expect.numbers, "contains": turn.expect.contains,
                                           "refusal": turn.expect.refusal}, sum(map(len, turn.rounds))), turn


def test_request_carries_every_argument_value_it_needs(episodes):
    """Values a call takes from the user are in that turn's (or an earlier) user message; chained values come from
    an earlier tool result."""
    for e in episodes:
        said, returned = "", ""
        for turn in e.turns:
            said += " " + turn.user
            for calls in turn.rounds:
                for c in calls:
                    for v in c.arguments.values():
                        assert str(v) in said or str(v) in returned, (e.kind, turn.user, c.arguments)
                returned += " ".join(json.dumps(c.result) for c in calls)


def _topic(text: str) -> str | None:
    """The topic a request or tool description is about (the longest topic named in it)."""
    named = [t.thing for t in generic.TOPICS if t.thing in text.lower()]
    return max(named, key=len) if named else None


def test_no_tool_fits_declares_no_tool_for_the_asked_topic(episodes):
    n = 0
    for e in (e for e in episodes if e.kind == "generic_no_tool_fits"):
        asked = _topic(e.turns[0].user)
        assert asked and e.tools
        assert all(_topic(t["function"]["description"]) != asked for t in e.tool_specs())
        n += 1
    assert n > 50


def test_mixed_train_set_keeps_the_heldout_property():
    train = list(train_episodes(9, 3000, 0.5))
    n_generic = sum(e.kind.startswith("generic") for e in train)
    assert 1300 < n_generic < 1700
    heldout = list(synthetic.episodes(9, "heldout", 600))
    synthetic.check_heldout(train, heldout)
    assert not {t for e in train for t in e.tools if t in TOOLS and TOOLS[t].split == "heldout"}
    # no held-out string value (city, item, date, element name...) occurs as a word in a generic conversation
    assert heldout_words_in([e for e in train if e.kind.startswith("generic")], heldout) == []
