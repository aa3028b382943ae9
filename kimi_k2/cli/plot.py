"""`kimi-k2 plot RUN_DIR [RUN_DIR ...]`: PNG curves from the runs' log.jsonl, written to the first RUN_DIR/plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from kimi_k2.train.plot import plot_runs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", help="training output directories (with log.jsonl)")
    parser.add_argument("--out", help="where to write the PNGs (default: FIRST_RUN_DIR/plots)")
    parser.add_argument("--x", default="step", choices=["step", "tokens"], help="x axis")


def run(args: argparse.Namespace) -> int:
    dirs = [Path(d) for d in args.run_dirs]
    files = plot_runs(dirs, Path(args.out) if args.out else dirs[0] / "plots", args.x)
    for f in files:
        print(f)
    return 0
