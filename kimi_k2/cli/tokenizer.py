"""`kimi-k2 tokenizer train|encode|decode`: train a Kimi-format BPE tokenizer, or run one on text."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kimi_k2.cli.options import CommandError
from kimi_k2.tokenizer.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE with the Kimi pattern; write a tokenizer directory")
    train.add_argument("--corpus", nargs="+", required=True, help="text files or directories (read recursively)")
    train.add_argument("--vocab-size", type=int, required=True, help="base tokens (bytes + merges); +256 specials")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--min-frequency", type=int, default=2)
    enc = sub.add_parser("encode", help="print the token ids of TEXT (or stdin) as JSON")
    enc.add_argument("--tokenizer", required=True, help="tokenizer directory")
    enc.add_argument("text", nargs="?", help="text to encode (default: stdin)")
    enc.add_argument("--no-special", action="store_true", help="encode special-token text as plain text")
    dec = sub.add_parser("decode", help="print the text of token ids given as JSON (or on stdin)")
    dec.add_argument("--tokenizer", required=True, help="tokenizer directory")
    dec.add_argument("ids", nargs="?", help="JSON list of ids (default: stdin)")


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        from kimi_k2.tokenizer.trainer import train_tokenizer

        t0 = time.perf_counter()
        tok = train_tokenizer(args.corpus, args.vocab_size, args.out, min_frequency=args.min_frequency)
        print(f"trained {tok.num_base_tokens} base tokens (+256 special, n_vocab {tok.n_vocab}) in "
              f"{time.perf_counter() - t0:.1f}s -> {args.out}")
        return 0
    tok = Tokenizer.from_pretrained(args.tokenizer)
    if args.action == "encode":
        text = args.text if args.text is not None else sys.stdin.read()
        print(json.dumps(tok.encode(text, allow_special=not args.no_special)))
        return 0
    raw = args.ids if args.ids is not None else sys.stdin.read()
    try:
        ids = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CommandError(f"ids must be a JSON list of integers: {e}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise CommandError("ids must be a JSON list of integers")
    sys.stdout.write(tok.decode(ids))
    return 0
