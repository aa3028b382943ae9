"""`kimi-k2 data synth|corpus|tasks`: synthetic conversations, the pretraining corpus, the held-out benchmarks."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kimi_k2.data import corpus, synthetic

TASKS_DIR = Path(__file__).resolve().parent.parent / "eval" / "tasks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("synth", help="synthetic chat/tool-use conversations: DIR/train.jsonl and DIR/heldout.jsonl")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--n", type=int, required=True, help="number of train conversations")
    p.add_argument("--heldout-n", type=int, default=None, help="number of held-out conversations (default n/10)")
    p.add_argument("--seed", type=int, default=0)
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


def run(args: argparse.Namespace) -> int:
    if args.action == "synth":
        if args.n < 1:
            raise ValueError(f"--n must be >= 1, got {args.n}")
        heldout_n = args.heldout_n if args.heldout_n is not None else max(1, args.n // 10)
        train = list(synthetic.episodes(args.seed, "train", args.n))
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
