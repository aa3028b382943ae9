"""Our tiktoken vocabulary as a byte-level BPE (gpt2 style), for llama.cpp's GGUF and for an HF `tokenizer.json`.

tiktoken stores only ranks: token bytes -> id, the merge order being the rank order. Byte-level BPE formats want
(a) each token as a string of printable stand-ins for its bytes (GPT-2's `bytes_to_unicode` table) and (b) the merge
list. A token of rank r was made by the merge that BPE performs last when it runs over the token's own bytes with only
the ranks below r allowed (the method tiktoken's docs and llama.cpp's Kimi-K2 conversion use); those two parts, in rank
order, are the merge list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kimi_k2.tokenizer import Tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte -> one printable character (printable latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_B2U = bytes_to_unicode()


def token_string(token: bytes) -> str:
    return "".join(_B2U[b] for b in token)


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merging of `token` using only merges whose result has rank < max_rank (lowest rank first)."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


@dataclass
class ByteLevelVocab:
    tokens: list[str]  # id -> byte-level string, `vocab_size` long: padding ids are "[PAD{id}]"
    kinds: list[str]  # id -> "normal" | "control" (the 256 special slots) | "unused" (padding up to vocab_size)
    merges: list[tuple[str, str]]  # in priority order
    num_base: int  # ids below this are BPE tokens
    special_ids: dict[str, int]


def byte_level_vocab(tokenizer_dir: str | Path, vocab_size: int) -> ByteLevelVocab:
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    ranks: dict[bytes, int] = tok.model._mergeable_ranks  # tiktoken.Encoding keeps the ranks it was built from
    if tok.n_vocab > vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {tok.n_vocab} ids (with its 256 special slots) but "
                         f"the model's vocab_size is {vocab_size}: its embedding has no row for the last ids")
    tokens: list[str] = [""] * vocab_size
    kinds = ["unused"] * vocab_size
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        tokens[rank] = token_string(token)
        kinds[rank] = "normal"
        if len(token) == 1 and rank >= 256:
            raise ValueError(f"byte {token!r} has rank {rank}: byte-level BPE wants the 256 bytes first")
        if len(token) > 1:
            parts = bpe_parts(ranks, token, max_rank=rank)
            if len(parts) != 2 or any(ranks.get(x, rank) >= rank for x in parts):
                raise ValueError(f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens: "
                                 "not a BPE vocabulary")
            merges.append((token_string(parts[0]), token_string(parts[1])))
    for content, i in tok.special_tokens.items():
        tokens[i] = content
        kinds[i] = "control"
    for i in range(tok.n_vocab, vocab_size):
        tokens[i] = f"[PAD{i}]"
    return ByteLevelVocab(tokens, kinds, merges, tok.num_base_tokens, dict(tok.special_tokens))


def hf_tokenizer_json(tokenizer_dir: str | Path, vocab_size: int) -> str:
    """An HF `tokenizers` byte-level BPE with the same ids as our tiktoken tokenizer (for vLLM and transformers)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from kimi_k2.tokenizer.specials import PAT_STR

    v = byte_level_vocab(tokenizer_dir, vocab_size)
    vocab = {t: i for i, t in enumerate(v.tokens[: v.num_base])}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=v.merges, ignore_merges=False, fuse_unk=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    specials = sorted(v.special_ids.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(content, special=True, normalized=False) for content, _ in specials])
    for content, i in specials:
        if hf.token_to_id(content) != i:
            raise ValueError(f"special token {content!r} got id {hf.token_to_id(content)} in tokenizer.json, not {i}")
    return hf.to_str()


def write_hf_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path, vocab_size: int, bos: str = "[BOS]",
                       eos: str = "[EOS]") -> None:
    """tokenizer.json + a tokenizer_config.json that names the fast tokenizer class (no remote code needed)."""
    out = Path(out_dir)
    (out / "tokenizer.json").write_text(hf_tokenizer_json(tokenizer_dir, vocab_size))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": 1 << 20,
              "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
