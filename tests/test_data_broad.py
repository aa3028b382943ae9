import random
import re
from pathlib import Path

import pytest
from data_fixtures import heldout_words_in

from kimi_k2.cli.data import train_episodes
from kimi_k2.data import broad, synthetic
from kimi_k2.data import schema as js
from kimi_k2.data.tools import TOOLS
from kimi_k2.eval.scoring import answer_ok
from kimi_k2.tokenizer import Tokenizer

NANO = Path(__file__).resolve().parent.parent / "models" / "k2-nano-instruct"


@pytest.fixture(scope="module")
def pieces() -> tuple[str, ...]:
    return broad.word_pieces(Tokenizer.from_pretrained(NANO))


@pytest.fixture(scope="module", params=["syllables", "pieces"])
def episodes(request, pieces):
    use = pieces if request.param == "pieces" else ()
    return ([broad.broad_episode(5, i, use) for i in range(2000)]
            + [broad.session_episode(5, i, use) for i in range(300)]
            + [broad.broad_episode(5, i, use, cased=True) for i in range(2000, 2400)]
            + [broad.broad_episode(5, i, use, cased=i % 2 == 0, freeform=True) for i in range(2400, 2800)])


def test_deterministic_per_index():
    a = broad.broad_episode(1, 17).conversation()
    assert a == broad.broad_episode(1, 17).conversation()
    assert a != broad.broad_episode(2, 17).conversation()


def test_every_kind_appears_and_calls_fit_the_declared_tools(episodes):
    assert {e.kind for e in episodes} == set(broad.KINDS) | {"broad_session"}
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
                        assert synthetic.fmt(v) in said, (e.kind, turn.user, c.arguments)


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
    assert refusals > 100


@pytest.mark.parametrize("with_pieces", [False, True])
def test_mixed_train_set_keeps_the_heldout_property(with_pieces, pieces):
    train = list(train_episodes(9, 3000, 0.3, 0.2, broad_fraction=0.5, pieces=pieces if with_pieces else (),
                                session_fraction=0.3))
    n_broad = sum(e.kind.startswith("broad") for e in train)
    assert 1350 < n_broad < 1650
    assert sum(e.kind.startswith("generic") for e in train) > 300
    heldout = list(synthetic.episodes(9, "heldout", 600))
    synthetic.check_heldout(train, heldout)
    # no held-out string value (city, item, element...) occurs as a word in a broad conversation
    assert heldout_words_in([e for e in train if e.kind.startswith("broad")], heldout) == []


def test_broad_zero_leaves_the_older_mixes_unchanged():
    old = [e.conversation() for e in train_episodes(3, 200, 0.5, 0.25)]
    assert old == [e.conversation() for e in train_episodes(3, 200, 0.5, 0.25, broad_fraction=0.0)]


def test_sessions_zero_leaves_the_broad_mix_unchanged_and_sessions_replace_broad_episodes_only():
    old = [e.conversation() for e in train_episodes(3, 300, 0.3, 0.2, broad_fraction=0.5)]
    assert old == [e.conversation() for e in train_episodes(3, 300, 0.3, 0.2, broad_fraction=0.5,
                                                            session_fraction=0.0)]
    new = [e.conversation() for e in train_episodes(3, 300, 0.3, 0.2, broad_fraction=0.5, session_fraction=0.5)]
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert 40 < len(changed) < 110
    assert all(a["kind"].startswith("broad") and b["kind"] == "broad_session" for a, b in changed)


def test_cased_zero_leaves_the_mix_unchanged_and_cased_episodes_vary_the_case_of_topic_words():
    old = [e.conversation() for e in train_episodes(4, 300, 0.3, 0.2, broad_fraction=0.5, session_fraction=0.3)]
    assert old == [e.conversation() for e in train_episodes(4, 300, 0.3, 0.2, broad_fraction=0.5,
                                                            session_fraction=0.3, cased_fraction=0.0)]
    new = [e.conversation() for e in train_episodes(4, 300, 0.3, 0.2, broad_fraction=0.5, session_fraction=0.3,
                                                    cased_fraction=0.5)]
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert 40 < len(changed) < 110 and all(a["kind"] == b["kind"] and a["kind"].startswith("broad")
                                           for a, b in changed)
    plain = [broad.broad_episode(6, i) for i in range(400)]
    cased = [broad.broad_episode(6, i, cased=True) for i in range(400)]

    def capitalised_topics(eps):  # invented tools whose description writes a word of their name capitalised
        return sum(any(f" {w.capitalize()}" in spec["function"]["description"]
                       for w in spec["function"]["name"].split("_") if len(w) > 3 and w.islower())
                   for e in eps for spec in e.tool_specs() if spec["function"]["name"] not in TOOLS)

    assert capitalised_topics(plain) == 0 and capitalised_topics(cased) > 40
    leading = [e for e in cased if e.kind == "broad_single" and e.turns[0].templates[0] in broad._LEADING_ASKS]
    assert len(leading) > 20


def test_freeform_zero_leaves_the_mix_unchanged_and_freeform_descriptions_vary():
    kw = dict(broad_fraction=0.5, session_fraction=0.3, cased_fraction=0.3)
    old = [e.conversation() for e in train_episodes(4, 300, 0.3, 0.2, **kw)]
    assert old == [e.conversation() for e in train_episodes(4, 300, 0.3, 0.2, **kw, freeform_fraction=0.0)]
    new = [e.conversation() for e in train_episodes(4, 300, 0.3, 0.2, **kw, freeform_fraction=0.5)]
    assert all(a["kind"].startswith("broad") for a, b in zip(old, new, strict=True) if a != b)
    plain = {s["function"]["description"] for i in range(300) for s in broad.broad_episode(6, i).tool_specs()}
    free = {s["function"]["description"] for i in range(300)
            for s in broad.broad_episode(6, i, freeform=True).tool_specs() if s["function"]["name"] not in TOOLS}
    shapes = {re.sub(r"\b[a-z]+\b", "w", d.lower()) for d in free}  # sentence shapes, words blanked
    assert len(shapes) > 3 * len({re.sub(r"\b[a-z]+\b", "w", d.lower()) for d in plain})
    assert len(free & plain) < 0.2 * len(free)  # the conversions and calculators keep their own sentences


def test_a_session_asks_for_each_declared_tool_once(episodes):
    sessions = [e for e in episodes if e.kind == "broad_session"]
    assert len(sessions) == 300
    for e in sessions:
        called = [c.name for turn in e.turns for calls in turn.rounds for c in calls]
        assert 3 <= len(called) == len(set(called)) <= 4
        assert len(e.tools) - len(called) in (0, 1)  # at most one distractor
        assert sum(not t.rounds for t in e.turns) <= 1  # at most one refusal
        assert all(len(t.rounds) <= 1 and len(t.rounds[0] if t.rounds else []) <= 1 for t in e.turns)
    orders = {tuple(c.name == e.tools[0] for t in e.turns for calls in t.rounds for c in calls) for e in sessions}
    assert len(orders) > 3  # the turns do not follow the declaration order


def test_words_cover_many_tokenizer_pieces():
    rng = random.Random(0)
    made = [broad.word(rng) for _ in range(3000)]
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
    rng = broad.Draws("words", pieces)
    made = [broad.word(rng) for _ in range(30000)]
    assert not {w for w in made for v in (w, w.removesuffix("s")) if v in broad._HELDOUT_TOPICS}
    assert {"temperature", "forecast", "distance", "celsius"} <= broad._HELDOUT_TOPICS
    text = " ".join(made)
    assert sum(p in text for p in pieces) > 0.95 * len(pieces)
    assert sum(w in pieces for w in made) > 0.25 * len(made)  # about a third are one whole piece
    assert broad.Draws("x").pieces == () and broad.word(broad.Draws("x")) == broad.word(random.Random("x"))


def test_synth_cli_names_a_missing_vocab(tmp_path, capsys):
    from kimi_k2.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "10", "--broad", "0.5",
                 "--vocab", str(tmp_path / "nope")]) == 1
    assert f"kimi-k2 data: error: no tiktoken.model in {tmp_path / 'nope'}" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_synth_cli_names_a_bad_fraction(tmp_path, capsys):
    from kimi_k2.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--n", "10", "--broad", "1.5"]) == 1
    assert "kimi-k2 data: error: --broad must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing half-written
