"""Conversations over invented tools (kimi_k2/data/invented.py): what they teach, and that nothing is held out."""

import random
import re
from pathlib import Path

import pytest

from kimi_k2.data import invented
from kimi_k2.data.heldout import check_heldout, leaked_words
from kimi_k2.data.synth import train_episodes
from kimi_k2.eval import scenarios
from kimi_k2.eval import schema as js
from kimi_k2.eval.scoring import answer_ok
from kimi_k2.eval.tools import TOOLS
from kimi_k2.tokenizer import Tokenizer

NANO = Path(__file__).resolve().parent.parent / "models" / "k2-nano-instruct"


@pytest.fixture(scope="module")
def pieces() -> tuple[str, ...]:
    return invented.word_pieces(Tokenizer.from_pretrained(NANO))


@pytest.fixture(scope="module", params=["syllables", "pieces"])
def episodes(request, pieces):
    return [invented.invented_episode(5, i, pieces if request.param == "pieces" else ()) for i in range(1200)]


def test_deterministic_per_index():
    a = invented.invented_episode(1, 17).conversation()
    assert a == invented.invented_episode(1, 17).conversation()
    assert a != invented.invented_episode(2, 17).conversation()


def test_every_kind_appears_and_calls_fit_the_declared_tools(episodes):
    assert {e.kind for e in episodes} == set(invented.KINDS)
    for e in episodes:
        conv = e.conversation()
        declared = {t["function"]["name"]: t["function"]["parameters"] for t in conv["tools"]}
        assert len(declared) == len(conv["tools"]) >= 1
        for turn in e.turns:
            for calls in turn.rounds:
                for c in calls:
                    assert js.errors(c.arguments, declared[c.name]) == [], (e.kind, c)
            assert answer_ok(turn.answer, {"numbers": turn.expect.numbers, "refusal": turn.expect.refusal},
                             sum(map(len, turn.rounds))), turn


def test_arguments_are_copied_from_the_request_and_numbers_stay_in_train_ranges(episodes):
    for e in episodes:
        said = ""
        for turn in e.turns:
            said += " " + turn.user
            for c in (c for calls in turn.rounds for c in calls):
                for v in c.arguments.values():
                    if isinstance(v, str):
                        assert v in said, (e.kind, turn.user, c.arguments)  # verbatim, case included
                    else:  # held-out numeric arguments are integers <= 6 or non-integers below 401
                        assert v == int(v) and v >= 7 or v >= 401, (e.kind, c.arguments)
                        assert scenarios.fmt(v) in said, (e.kind, turn.user, c.arguments)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_the_called_tool_shares_a_word_with_the_request_and_no_distractor_shares_its_topic(episodes):
    """The skill taught is reading the declared tools: the request names the topic (from the tool's name or its
    description) or, for a conversion, the enum units; a refusal's request names no declared tool's topic."""
    refusals = 0
    for e in episodes:
        specs = {s["function"]["name"]: s["function"] for s in e.tool_specs()}
        said = ""
        for turn in e.turns:  # a follow-up ("And Spoass?") leans on the turn before
            said += " " + turn.user
            for c in (c for calls in turn.rounds for c in calls):
                f = specs[c.name]
                assert _words(said) & _words(f["name"].replace("_", " ") + " " + f["description"]), turn.user
        if e.kind == "broad_refusal":
            refusals += 1
            assert not e.turns[0].rounds
            asked = _words(e.turns[0].user) - {"level", "rate", "count", "index", "the", "of", "for", "a"}
            for f in specs.values():
                if f["name"] not in TOOLS:
                    topic = f["name"].split("_")
                    assert not asked & set(topic) - {"get", "lookup", "by", "place", "person", "object", "code",
                                                     "date", "fetch", "find", "check", "query", "read", "compute",
                                                     "estimate", "show", "list", "search", "level", "rate", "count",
                                                     "index"}, (e.turns[0].user, f["name"])
    assert refusals > 60


@pytest.mark.parametrize("with_pieces", [False, True])
def test_mixed_train_set_keeps_the_heldout_property(with_pieces, pieces):
    train = list(train_episodes(9, 2000, 0.5, pieces if with_pieces else ()))
    assert 900 < sum(e.kind.startswith("broad") for e in train) < 1100
    heldout = list(scenarios.episodes(9, "heldout", 400))
    check_heldout(train, heldout)
    # no held-out string value (city, item, element...) occurs as a word anywhere in an invented-tool conversation
    assert leaked_words([e for e in train if e.kind.startswith("broad")], heldout) == []


def test_words_cover_many_tokenizer_pieces():
    rng = random.Random(0)
    made = [invented.word(rng) for _ in range(3000)]
    assert len(set(made)) > 2500
    assert {ch for w in made for ch in w} == set("abcdefghijklmnopqrstuvwxyz")


def test_word_pieces_are_the_word_tokens_of_the_tokenizer(pieces):
    tok = Tokenizer.from_pretrained(NANO)
    assert all(p.isascii() and p.isalpha() and p == p.lower() and len(p) >= 2 for p in pieces)
    assert list(pieces) == sorted(set(pieces))
    for w in ("temperature", "celsius", "element"):  # single tokens of the shipped tokenizer
        assert len(tok.encode(w)) == 1 and w in pieces
    assert len(pieces) > 3000


def test_piece_words_reach_the_pieces_but_never_a_heldout_topic(pieces):
    rng = invented.Draws("words", pieces)
    made = [invented.word(rng) for _ in range(12000)]
    assert not {w for w in made for v in (w, w.removesuffix("s")) if v in invented.HELDOUT_TOPICS}
    assert {"temperature", "forecast", "distance", "celsius"} <= invented.HELDOUT_TOPICS
    text = " ".join(made)
    assert sum(p in text for p in pieces) > 0.9 * len(pieces)
    assert sum(w in pieces for w in made) > 0.25 * len(made)  # about a third are one whole piece
    assert invented.Draws("x").pieces == () and invented.word(invented.Draws("x")) == invented.word(random.Random("x"))
