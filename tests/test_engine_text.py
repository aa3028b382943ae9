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
