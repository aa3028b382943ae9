"""Incremental detokenization and stop strings: no broken UTF-8, never any part of a stop string."""

import pytest

from kimi_k2.engine.detokenize import DecodeDiffDetokenizer, TextStream


class ByteTokenizer:
    """A complete byte-level tokenizer: token id = one UTF-8 byte."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream(text, stop):
    tok = ByteTokenizer()
    ts = TextStream(tok, stop)
    pieces = [ts.push(t) for t in tok.encode(text)]
    pieces.append(ts.finish())
    return pieces, ts.stopped


def test_detokenizer_never_splits_a_character():
    tok = ByteTokenizer()
    d = DecodeDiffDetokenizer(tok)
    text = "héllo wörld 你好 🙂!"
    pieces = [d.push(t) for t in tok.encode(text)] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.parametrize("text, stop, expected", [
    ("hello world. bye", ["."], "hello world"),
    ("abcabd", ["abd"], "abc"),
    ("say STOP now", ["STOP", "now"], "say "),
    ("no stop here", ["xyz"], "no stop here"),
    ("café🙂end", ["🙂"], "café"),
    ("aaab", ["aab"], "a"),
])
def test_stop_strings_are_cut_and_never_leak(text, stop, expected):
    pieces, stopped = stream(text, stop)
    out = "".join(pieces)
    assert out == expected
    assert stopped == any(s in text for s in stop)
    sent = ""
    for p in pieces:  # no prefix sent so far ever contains a stop string or ends inside one that then completes
        sent += p
        assert not any(s in sent for s in stop)


def test_held_back_text_is_released_when_it_cannot_be_a_stop():
    tok = ByteTokenizer()
    ts = TextStream(tok, ["END"])
    got = "".join(ts.push(t) for t in tok.encode("xEN"))
    assert got == "x"  # "EN" could still become END
    got += "".join(ts.push(t) for t in tok.encode("Dy"))
    assert got == "x" and ts.stopped
    ts2 = TextStream(tok, ["END"])
    got2 = "".join(ts2.push(t) for t in tok.encode("xENx"))
    assert got2 == "xENx"


def python_lines(fn) -> int:
    """Python lines run inside kimi_k2/engine/detokenize.py while fn() runs: a deterministic measure of work."""
    import sys

    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename.endswith("detokenize.py"):
            if event == "line":
                count += 1
            return trace
        return None

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


def test_stop_check_work_does_not_grow_with_the_stop_length():
    """A long stop string (here never matched, as `stop: ["Q" * 600000]` in issue 18) must cost the same per token as
    a short one: the check is linear in the text streamed, not quadratic in the stop string."""
    tok = ByteTokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 4

    def run(stop_len: int):
        def go():
            ts = TextStream(tok, ["Q" * stop_len, "x" * stop_len + "y"])
            for t in tok.encode(text):
                ts.push(t)
            ts.finish()
        return go

    short, long = python_lines(run(8)), python_lines(run(20_000))
    assert long <= short * 1.1 + 50, (short, long)


def test_stop_strings_with_repeated_prefixes_and_overlaps():
    for text, stop, expected in [
        ("xxaxxaxxb", ["xxaxxb"], "xxa"),
        ("abababc", ["ababc"], "ab"),
        ("abcd", ["abcd", "bc"], "a"),  # streamed char by char, "bc" completes first
        ("aaaa", ["aaa"], ""),
        ("abc", ["abcd"], "abc"),  # a prefix of the stop string at the very end is released at finish
    ]:
        pieces, _ = stream(text, stop)
        assert "".join(pieces) == expected, (text, stop, pieces)


def test_stop_cut_matches_a_brute_force_reference():
    import random

    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(rng.randrange(0, 14)))
        stop = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 3))]
        ends = [(text.find(s) + len(s), text.find(s)) for s in stop if s in text]
        expected = text[:min(ends)[1]] if ends else text
        pieces, stopped = stream(text, stop)
        assert "".join(pieces) == expected and stopped == bool(ends), (text, stop)
