"""Tokenizer loading, special-token layout, encode/decode and the Kimi pre-tokenization pattern."""

import base64
import itertools
import json

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_k2.tokenizer import Tokenizer
from kimi_k2.tokenizer.specials import K2_SPECIAL_OFFSETS, PAT_STR


@pytest.fixture(scope="module")
def tok(k2_tokenizer_dir):
    return Tokenizer.from_pretrained(k2_tokenizer_dir)


texts = st.text(st.characters(codec="utf-8"), max_size=80) | st.lists(
    st.sampled_from(["Hello", " world", "你好", "世界", "ÉTUDE", "don't", "'LL", " 12345", "\n\n", "  ", "\t", "é",
                     "e\u0301", "ΑΒΓ", "こんにちは", "😀", "...", "<|im_end|>", "[EOS]", "\r\n", " x"]),
    max_size=20).map("".join)


def test_layout_matches_k2_offsets(tok):
    n = tok.num_base_tokens
    assert tok.n_vocab == n + 256
    for k, (name, _) in K2_SPECIAL_OFFSETS.items():
        assert tok.special_tokens[name] == n + k
    assert (tok.bos_id, tok.eos_id, tok.im_end_id, tok.pad_id) == (n, n + 1, n + 2, n + 255)
    assert tok.stop_token_ids == [n + 1, n + 2]
    assert tok.special_tokens[f"<|reserved_token_{n + 5}|>"] == n + 5
    assert len(set(tok.special_tokens.values())) == 256


@settings(max_examples=150, deadline=None)
@given(texts)
def test_encode_decode_round_trip(tok, text):
    for allow in (True, False):
        ids = tok.encode(text, allow_special=allow)
        assert all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(texts)
def test_pretokenization_is_the_kimi_pattern(tok, text):
    """tiktoken encodes each regex piece on its own: the ids equal the concatenated ids of `regex` V1 pieces."""
    pieces = regex.findall(PAT_STR, text, flags=regex.V1)
    assert "".join(pieces) == text
    expected = list(itertools.chain.from_iterable(tok.encode(p, allow_special=False) for p in pieces))
    assert tok.encode(text, allow_special=False) == expected


def test_pattern_intersection_keeps_han_apart():
    assert regex.findall(PAT_STR, "abc你好def", flags=regex.V1) == ["abc", "你好", "def"]
    assert regex.findall(PAT_STR, " I'LL go", flags=regex.V1) == [" I'LL", " go"]


def test_special_token_text_handling(tok):
    text = "a<|im_end|>b"
    assert tok.im_end_id in tok.encode(text)  # the original's default
    plain = tok.encode(text, allow_special=False)
    assert tok.im_end_id not in plain and tok.decode(plain) == text
    some = tok.encode("<|im_end|>[EOS]", allow_special={"[EOS]"})
    assert tok.eos_id in some and tok.im_end_id not in some
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("x", allow_special={"<|nope|>"})


def test_decode_special_and_skip(tok):
    begin = tok.special_tokens["<|tool_calls_section_begin|>"]
    ids = [tok.bos_id, *tok.encode("hi"), begin, tok.im_end_id]
    assert tok.decode(ids) == "[BOS]hi<|tool_calls_section_begin|><|im_end|>"
    # tool-call markers are `special: false` in K2, so skip_special_tokens keeps them
    assert tok.decode(ids, skip_special_tokens=True) == "hi<|tool_calls_section_begin|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_token_lookup(tok):
    assert tok.token_to_id("<|im_middle|>") == tok.num_base_tokens + 17
    assert tok.token_to_id("a") == ord("a")  # single bytes keep ranks 0..255
    assert tok.id_to_token_bytes(ord("a")) == b"a"
    assert tok.id_to_token_bytes(tok.eos_id) == b"[EOS]"
    with pytest.raises(KeyError, match="not a token"):
        tok.token_to_id("<|no_such_token|>")


def test_encode_batch_and_long_runs(tok):
    texts = ["one", "two three", "", "x" * 30_000 + " y", " " * 26_000]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in tok.encode_batch(texts)] == texts


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    assert again.special_tokens == tok.special_tokens
    assert again.chat_template == tok.chat_template
    text = "The quick brown fox <|im_end|> 你好"
    assert again.encode(text) == tok.encode(text)


def test_loads_real_k2_layout(tmp_path):
    """The real K2 files: 163584 base ranks, added_tokens_decoder ids 163584.. (kimi_k2_formats.md §2.1)."""
    two = (bytes(p) for p in itertools.product(range(256), repeat=2))
    three = (bytes(p) for p in itertools.product(range(256), repeat=3))
    tokens = itertools.islice(itertools.chain((bytes([b]) for b in range(256)), two, three), 163584)
    (tmp_path / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n"
                                                     for i, t in enumerate(tokens)))
    table = {163584: "[BOS]", 163585: "[EOS]", 163586: "<|im_end|>", 163595: "<|tool_calls_section_begin|>",
             163601: "<|im_middle|>", 163838: "[UNK]", 163839: "[PAD]"}
    decoder = {str(i): {"content": c, "special": not c.startswith("<|tool")} for i, c in table.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.num_base_tokens, tok.n_vocab) == (163584, 163840)
    assert (tok.bos_id, tok.eos_id, tok.im_end_id, tok.pad_id) == (163584, 163585, 163586, 163839)
    assert tok.token_to_id("<|reserved_token_163589|>") == 163589
    assert tok.token_to_id("<|reserved_token_163588|>") == 163588  # <|im_assistant|> is not in this excerpt
    assert tok.decode(tok.encode("héllo<|im_middle|>")) == "héllo<|im_middle|>"


def test_bad_directories(tmp_path, k2_tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="tiktoken.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="tiktoken.model:2"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b + 1}\n"
                                                     for b in range(256)))
    with pytest.raises(ValueError, match="ranks must be 0..255"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tiktoken.model").write_text((k2_tokenizer_dir / "tiktoken.model").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "x"}}}))
    with pytest.raises(ValueError, match="outside the special range"):
        Tokenizer.from_pretrained(tmp_path)


def _reference_runs(s, limit=25_000):
    """tokenization_kimi.py `_split_whitespaces_or_nonwhitespaces`, restated."""
    count, space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        if ch.isspace() != space:
            count, space = 1, ch.isspace()
        else:
            count += 1
            if count > limit:
                yield s[start:i]
                start, count = i, 1
    yield s[start:]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", " ", "\n", "\u3000", "é"]), st.integers(1, 60_000)), max_size=4))
def test_long_runs_split_like_the_original(segments):
    from kimi_k2.tokenizer.tokenizer import _runs

    s = "".join(ch * n for ch, n in segments)
    assert list(_runs(s)) == list(_reference_runs(s))
