"""`kimi-k2 data synth|corpus|tasks`: synthetic conversations, the pretraining corpus, the held-out benchmarks."""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator
from pathlib import Path

from kimi_k2.data import broad, corpus, generic, status, synthetic
from kimi_k2.tokenizer import Tokenizer

TASKS_DIR = Path(__file__).resolve().parent.parent / "eval" / "tasks"


_FRACTIONS = {  # the synth mix: flag -> help
    "generic": "fraction of train conversations over tools invented per conversation (generic.py)",
    "status": "fraction of the rest over one-word-result tools and self-introductions (status.py)",
    "broad": "fraction of train conversations over open-vocabulary invented tools (broad.py), drawn first",
    "sessions": "fraction of the broad conversations that are sessions: several requests over one tool set",
    "cased": "fraction of the broad conversations whose topic words change case between tools and requests",
    "freeform": "fraction of the broad conversations whose invented tools have free-form descriptions",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("synth", help="synthetic chat/tool-use conversations: DIR/train.jsonl and DIR/heldout.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="number of train conversations")
    p.add_argument("--heldout-n", type=int, default=None, help="number of held-out conversations (default n/10)")
    p.add_argument("--seed", type=int, default=0)
    for name, text in _FRACTIONS.items():
        p.add_argument(f"--{name}", type=float, default=0.0, metavar="F", help=text)
    p.add_argument("--vocab", type=Path, default=None, metavar="DIR",
                   help="a tokenizer directory: broad.py also makes its invented words of this tokenizer's word pieces")
    p = sub.add_parser("corpus", help="pretraining corpus from text already on the machine, as JSONL")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    p.add_argument("--sources", default=",".join(corpus.DEFAULT_SOURCES),
                   help=f"comma-separated, from {corpus.SOURCES}")
    p = sub.add_parser("tasks", help="regenerate the held-out benchmarks shipped in kimi_k2/eval/tasks")
    p.add_argument("--out", type=Path, default=TASKS_DIR)


def write_jsonl(path: Path, rows) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_benchmarks(out: Path) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    return {name: write_jsonl(out / f"{name}.jsonl", synthetic.tasks(seed, counts, name))
            for name, (seed, counts) in synthetic.BENCHMARKS.items()}


def train_episodes(seed: int, n: int, generic_fraction: float, status_fraction: float = 0.0,
                   broad_fraction: float = 0.0, pieces: tuple[str, ...] = (), session_fraction: float = 0.0,
                   cased_fraction: float = 0.0, freeform_fraction: float = 0.0) -> Iterator[synthetic.Episode]:
    """Train episode i is broad with probability `broad_fraction` (then a session with probability `session_fraction`,
    with words in varied case, `broad.recase`, with probability `cased_fraction`, with free-form tool descriptions
    with probability `freeform_fraction`), else generic with probability `generic_fraction`, else a status episode
    with probability `status_fraction`, else synthetic (each a seeded draw of its own, so one fraction never
    reshuffles the others). `pieces`: the word pieces of broad episodes (`broad.word_pieces`)."""
    for i in range(n):
        if broad_fraction and random.Random(f"{seed}/broad-mix/{i}").random() < broad_fraction:
            cased = bool(cased_fraction) and random.Random(f"{seed}/cased-mix/{i}").random() < cased_fraction
            free = bool(freeform_fraction) and random.Random(f"{seed}/freeform-mix/{i}").random() < freeform_fraction
            if session_fraction and random.Random(f"{seed}/session-mix/{i}").random() < session_fraction:
                yield broad.session_episode(seed, i, pieces, cased, free)
            else:
                yield broad.broad_episode(seed, i, pieces, cased, free)
        elif random.Random(f"{seed}/mix/{i}").random() < generic_fraction:
            yield generic.generic_episode(seed, i)
        elif random.Random(f"{seed}/status-mix/{i}").random() < status_fraction:
            yield status.status_episode(seed, i)
        else:
            yield synthetic.episode(seed, "train", i)


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        heldout_n = args.heldout_n if args.heldout_n is not None else max(1, args.n // 10)
        for name in _FRACTIONS:
            if not 0.0 <= (value := getattr(args, name)) <= 1.0:
                raise ValueError(f"--{name} must be in [0, 1], got {value}")
        pieces = broad.word_pieces(Tokenizer.from_pretrained(args.vocab)) if args.vocab else ()
        train = list(train_episodes(args.seed, args.n, args.generic, args.status, args.broad, pieces, args.sessions,
                                    args.cased, args.freeform))
        heldout = list(synthetic.episodes(args.seed, "heldout", heldout_n))
        synthetic.check_heldout(train, heldout)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, eps in (("train", train), ("heldout", heldout)):
            write_jsonl(args.out / f"{name}.jsonl", (e.conversation() for e in eps))
        print(f"wrote {len(train)} train and {len(heldout)} held-out conversations to {args.out}")
    elif args.action == "corpus":
        stats = corpus.write(args.out, [s for s in args.sources.split(",") if s])
        for source, (docs, chars) in stats.items():
            print(f"{source:12s} {docs:6d} documents {chars / 1e6:8.2f} M chars")
        print(f"wrote {args.out}")
    else:
        for name, n in write_benchmarks(args.out).items():
            print(f"wrote {n} tasks to {args.out / name}.jsonl")
    return 0
