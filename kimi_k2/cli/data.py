"""`kimi-k2 data synth|corpus|tasks`: synthetic conversations, the pretraining corpus, the held-out benchmarks."""

from __future__ import annotations

import argparse
from pathlib import Path

from kimi_k2.data import corpus
from kimi_k2.data.invented import word_pieces
from kimi_k2.data.synth import train_episodes, write_synth
from kimi_k2.eval.benchmarks import TASKS_DIR, write_benchmarks
from kimi_k2.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("synth", help="synthetic chat/tool-use conversations: DIR/train.jsonl and DIR/heldout.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="number of train conversations")
    p.add_argument("--heldout-n", type=int, default=None, metavar="M",
                   help="number of held-out conversations (default n/10)")
    p.add_argument("--seed", type=int, default=0, help="episode i depends only on (seed, i)")
    p.add_argument("--invented", type=float, default=0.0, metavar="F",
                   help="fraction of train conversations over tools invented per conversation (open vocabulary); "
                        "the rest use the executable train tools")
    p.add_argument("--vocab", type=Path, default=None, metavar="DIR",
                   help="a tokenizer directory: invented words are then also made of its word pieces")
    p = sub.add_parser("corpus", help="pretraining corpus from text already on the machine, as JSONL")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    p.add_argument("--sources", default=",".join(corpus.DEFAULT_SOURCES),
                   help=f"comma-separated, from {corpus.SOURCES}")
    p = sub.add_parser("tasks", help="regenerate the held-out benchmarks (kimi_k2/eval/benchmarks.py)")
    p.add_argument("--out", type=Path, default=TASKS_DIR, help="output directory (default: the shipped tasks)")


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        heldout_n = max(1, args.n // 10) if args.heldout_n is None else args.heldout_n
        if heldout_n < 0:
            raise ValueError(f"--heldout-n must be >= 0, got {heldout_n}")
        if not 0.0 <= args.invented <= 1.0:
            raise ValueError(f"--invented must be in [0, 1], got {args.invented}")
        if args.vocab and not args.invented:
            raise ValueError("--vocab shapes the invented conversations only: give --invented F > 0 with it")
        pieces = word_pieces(Tokenizer.from_pretrained(args.vocab)) if args.vocab else ()
        n_train, n_heldout = write_synth(args.out, train_episodes(args.seed, args.n, args.invented, pieces),
                                         args.seed, heldout_n)
        print(f"wrote {n_train} train and {n_heldout} held-out conversations to {args.out}")
    elif args.action == "corpus":
        stats = corpus.write(args.out, [s for s in args.sources.split(",") if s])
        for source, (docs, chars) in stats.items():
            print(f"{source:12s} {docs:6d} documents {chars / 1e6:8.2f} M chars")
        print(f"wrote {args.out}")
    else:
        for name, n in write_benchmarks(args.out).items():
            print(f"wrote {n} tasks to {args.out / name}.jsonl")
    return 0
