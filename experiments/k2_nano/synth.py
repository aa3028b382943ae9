"""The train-data mixes of the K2-Nano study: every SFT data set of the shipped passes (scripts/build_nano.sh) and of
the passes experiments/README.md tried, byte for byte.

    python -m experiments.k2_nano.synth --out DIR --n N --seed S [--generic F] [--status F] [--broad F]
        [--sessions F] [--cased F] [--freeform F] [--vocab TOKENIZER_DIR] [--heldout-n M]

writes DIR/train.jsonl and DIR/heldout.jsonl as `kimi-k2 data synth` does. Train episode i is, each a seeded draw of
its own (so one fraction never reshuffles the others):
- with probability `--broad`, over invented tools (kimi_k2/data/invented.py; `--vocab`: its words also of the
  tokenizer's word pieces), and then a session with probability `--sessions`, with words in varied case with
  probability `--cased`, with free-form tool descriptions with probability `--freeform` (data/variants.py);
- else with probability `--generic`, over tools of 24 fixed topics (data/generic.py);
- else with probability `--status`, a one-word-result tool call or a self-introduction (data/status.py);
- else a reference episode over the executable train tools (kimi_k2/eval/scenarios.py).
With only `--broad` this is `kimi-k2 data synth --invented`; with no fraction, `kimi-k2 data synth`.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from experiments.k2_nano.data.generic import generic_episode
from experiments.k2_nano.data.status import status_episode
from experiments.k2_nano.data.variants import session_episode, variant_episode
from kimi_k2.data.invented import invented_episode, word_pieces
from kimi_k2.data.synth import write_synth
from kimi_k2.eval import scenarios
from kimi_k2.tokenizer import Tokenizer

FRACTIONS = {  # flag -> help
    "generic": "fraction of train conversations over tools of 24 fixed topics (data/generic.py)",
    "status": "fraction of the rest over one-word-result tools and self-introductions (data/status.py)",
    "broad": "fraction of train conversations over invented tools (kimi_k2/data/invented.py), drawn first",
    "sessions": "fraction of the broad conversations that are sessions: several requests over one tool set",
    "cased": "fraction of the broad conversations whose topic words change case between tools and requests",
    "freeform": "fraction of the broad conversations whose invented tools have free-form descriptions",
}


def train_episodes(seed: int, n: int, generic: float = 0.0, status: float = 0.0, broad: float = 0.0,
                   pieces: tuple[str, ...] = (), sessions: float = 0.0, cased: float = 0.0,
                   freeform: float = 0.0) -> Iterator[scenarios.Episode]:
    """The `n` train episodes of `seed` in the mix the fractions give (module docstring); `pieces`: see
    `invented.word_pieces`."""
    for i in range(n):
        if broad and random.Random(f"{seed}/broad-mix/{i}").random() < broad:
            is_cased = bool(cased) and random.Random(f"{seed}/cased-mix/{i}").random() < cased
            is_free = bool(freeform) and random.Random(f"{seed}/freeform-mix/{i}").random() < freeform
            if sessions and random.Random(f"{seed}/session-mix/{i}").random() < sessions:
                yield session_episode(seed, i, pieces, is_cased, is_free)
            elif is_cased or is_free:
                yield variant_episode(seed, i, pieces, is_cased, is_free)
            else:
                yield invented_episode(seed, i, pieces)
        elif random.Random(f"{seed}/mix/{i}").random() < generic:
            yield generic_episode(seed, i)
        elif random.Random(f"{seed}/status-mix/{i}").random() < status:
            yield status_episode(seed, i)
        else:
            yield scenarios.episode(seed, "train", i)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.k2_nano.synth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--n", type=int, required=True, help="number of train conversations")
    ap.add_argument("--heldout-n", type=int, default=None, metavar="M",
                    help="number of held-out conversations (default n/10)")
    ap.add_argument("--seed", type=int, default=0, help="episode i depends only on (seed, i)")
    for name, text in FRACTIONS.items():
        ap.add_argument(f"--{name}", type=float, default=0.0, metavar="F", help=text)
    ap.add_argument("--vocab", type=Path, default=None, metavar="DIR",
                    help="a tokenizer directory: invented words are then also made of its word pieces")
    args = ap.parse_args(argv)
    try:
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        heldout_n = max(1, args.n // 10) if args.heldout_n is None else args.heldout_n
        if heldout_n < 0:
            raise ValueError(f"--heldout-n must be >= 0, got {heldout_n}")
        for name in FRACTIONS:
            if not 0.0 <= (value := getattr(args, name)) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {value}")
        pieces = word_pieces(Tokenizer.from_pretrained(args.vocab)) if args.vocab else ()
        fractions = {name: getattr(args, name) for name in FRACTIONS}
        train = train_episodes(args.seed, args.n, pieces=pieces, **fractions)
        n_train, n_heldout = write_synth(args.out, train, args.seed, heldout_n)
    except (ValueError, OSError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n_train} train and {n_heldout} held-out conversations to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
