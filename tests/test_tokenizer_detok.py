"""IncrementalDetokenizer: streamed text equals decode(all ids) and never holds a broken UTF-8 sequence."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_k2.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(k2_tokenizer_dir):
    return Tokenizer.from_pretrained(k2_tokenizer_dir)


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=40))
def test_stream_equals_decode(tok, text):
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    parts = [d.push(i) for i in ids]
    assert "\ufffd" not in "".join(parts) or "\ufffd" in text
    assert "".join(parts) + d.flush() == tok.decode(ids) == text


def test_multibyte_characters_are_held_back(tok):
    text = "😀你"
    ids = tok.encode(text)
    assert len(ids) > 2  # a 1024-token vocabulary splits these characters into byte tokens
    d = IncrementalDetokenizer(tok)
    parts = [d.push(i) for i in ids]
    assert [p for p in parts if p] == ["😀", "你"]
    assert d.flush() == ""


def test_invalid_bytes_and_truncation(tok):
    d = IncrementalDetokenizer(tok)
    ids = [0xE4, 0xBD, ord("a"), 0xFF]  # truncated 3-byte sequence, 'a', an impossible byte
    out = "".join(d.push(i) for i in ids) + d.flush()
    assert out == tok.decode(ids) == "\ufffda\ufffd"
    assert d.push(0xE4) == "" and d.flush() == "\ufffd"  # cut off at the end of the stream
    assert d.push(ord("b")) == "b"  # flush started afresh


def test_special_tokens(tok):
    d = IncrementalDetokenizer(tok, skip_special_tokens=True)
    begin = tok.special_tokens["<|tool_call_begin|>"]
    assert [d.push(i) for i in [ord("x"), tok.im_end_id, begin]] == ["x", "", "<|tool_call_begin|>"]
    assert IncrementalDetokenizer(tok).push(tok.im_end_id) == "<|im_end|>"
