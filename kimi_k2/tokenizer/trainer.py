"""Byte-level BPE training with the Kimi pre-tokenization pattern, written as a Kimi-format tokenizer directory.

The merges are learned by Hugging Face `tokenizers` (Rust, multi-threaded): Split(PAT_STR) then byte-level
mapping, then BpeTrainer. Oniguruma, the regex engine of `tokenizers`, understands the pattern's class
intersection and splits text exactly as tiktoken does. Merge i becomes rank 256 + i of the merged bytes; the 256
single bytes keep ranks 0..255. tiktoken's "merge the adjacent pair whose concatenation has the lowest rank" then
reproduces the learned merges.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from kimi_k2.tokenizer.specials import PAT_STR
from kimi_k2.tokenizer.tokenizer import Tokenizer as KimiTokenizer

_CHUNK_CHARS = 1 << 20


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable char table, the alphabet of `tokenizers`' ByteLevel."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def iter_corpus(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str]:
    """Texts of the given files and of every file under the given directories (sorted), in ~1M-char chunks.
    Files that are not UTF-8 text are skipped."""
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"corpus path {p} does not exist")
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if not f.is_file():
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for i in range(0, len(text), _CHUNK_CHARS):
                yield text[i:i + _CHUNK_CHARS]


def train_bpe(corpus: Iterable[str | os.PathLike[str]] | Iterable[str], vocab_size: int, min_frequency: int = 2,
              texts: bool = False) -> tuple[dict[bytes, int], Tokenizer]:
    """-> (tiktoken mergeable ranks, the trained `tokenizers` model)."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be > 256 (the byte alphabet), got {vocab_size}")
    byte_char = _bytes_to_unicode()
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=list(byte_char.values()), special_tokens=[])
    model.train_from_iterator(corpus if texts else iter_corpus(corpus), trainer=trainer)
    char_byte = {c: b for b, c in byte_char.items()}
    ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    for merge in json.loads(model.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(bytes(char_byte[c] for c in left + right), len(ranks))
    return ranks, model


def train_tokenizer(corpus: Iterable[str | os.PathLike[str]] | Iterable[str], vocab_size: int,
                    out: str | os.PathLike[str] | None = None, min_frequency: int = 2,
                    texts: bool = False) -> KimiTokenizer:
    """Train a BPE of `vocab_size` base tokens (256 bytes + merges; fewer if the corpus runs out of pairs seen
    `min_frequency` times) on files/directories, or on strings with `texts=True`. The 256 special slots come on
    top: n_vocab = base + 256. Writes the Kimi directory to `out` when given and returns it loaded from there."""
    ranks, _ = train_bpe(corpus, vocab_size, min_frequency, texts)
    tok = KimiTokenizer(ranks)
    if out is None:
        return tok
    tok.save_pretrained(out)
    return KimiTokenizer.from_pretrained(out)
