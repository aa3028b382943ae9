"""BPE trainer: writes a Kimi-format directory the real loader reads, and tiktoken reproduces the learned merges."""

import base64
import json
import sysconfig
from pathlib import Path

import pytest

from kimi_k2.cli import main
from kimi_k2.tokenizer import Tokenizer
from kimi_k2.tokenizer.trainer import _bytes_to_unicode, train_bpe, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DOCS = STDLIB / "pydoc_data" / "topics.py"


def test_directory_format(k2_tokenizer_dir):
    d = Path(k2_tokenizer_dir)
    assert sorted(p.name for p in d.iterdir()) == ["chat_template.jinja", "tiktoken.model", "tokenizer_config.json"]
    ranks = {}
    for line in (d / "tiktoken.model").read_text().splitlines():
        token, rank = line.split(" ")
        ranks[base64.b64decode(token)] = int(rank)
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(ranks[bytes([b])] == b for b in range(256))
    config = json.loads((d / "tokenizer_config.json").read_text())
    ids = sorted(int(i) for i in config["added_tokens_decoder"])
    assert ids == list(range(len(ranks), len(ranks) + 256))
    assert config["added_tokens_decoder"][str(len(ranks) + 1)]["content"] == "[EOS]"
    assert config["added_tokens_decoder"][str(len(ranks) + 11)]["special"] is False
    tok = Tokenizer.from_pretrained(d)  # the load time on this dir is recorded in benchmarks/README.md
    assert tok.num_base_tokens == len(ranks) == 1024


def test_tiktoken_reproduces_the_trained_merges():
    """The same text through the `tokenizers` model that learned the merges and through our tiktoken loader gives
    the same token byte strings."""
    ranks, hf = train_bpe([DOCS], 2048)
    tok = Tokenizer(ranks)
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    text = (STDLIB / "json" / "decoder.py").read_text() + " 你好世界 Ünïcödé  \n\n\t x 😀 I'LL"
    ours = [tok.id_to_token_bytes(i) for i in tok.encode(text, allow_special=False)]
    theirs = [bytes(byte_of[c] for c in t) for t in hf.encode(text).tokens]
    assert ours == theirs
    assert len(ours) < len(text.encode()) / 2  # the merges actually compress


def test_train_from_texts_and_small_corpus():
    tok = train_tokenizer(["aaaa bbbb aaaa bbbb"] * 50, 300, texts=True)
    assert 256 < tok.num_base_tokens <= 300  # stops early when pairs run out
    assert tok.decode(tok.encode("aaaa bbbb")) == "aaaa bbbb"
    assert len(tok.encode("aaaa")) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["x"], 200, texts=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train_tokenizer(["/no/such/corpus"], 300)


def test_cli_train_and_encode(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(DOCS.read_text()[:200_000])
    (corpus / "blob.bin").write_bytes(bytes(range(256)) * 10)  # not UTF-8: skipped
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "600", "--out", str(out)]) == 0
    assert "n_vocab 856" in capsys.readouterr().out
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "hello <|im_end|>"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids[-1] == 600 + 2
    assert main(["tokenizer", "decode", "--tokenizer", str(out), json.dumps(ids)]) == 0
    assert capsys.readouterr().out == "hello <|im_end|>"
