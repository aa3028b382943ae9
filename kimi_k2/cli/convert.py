"""`kimi-k2 convert SRC DST --to {bf16,fp8,int4}`: re-encode a checkpoint, streaming one tensor at a time."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from kimi_k2.checkpoint.convert import FORMATS, convert
from kimi_k2.checkpoint.reader import CheckpointError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '64MiB' -> 64 * 2**20, '1000' -> 1000 (Hugging Face `max_shard_size` spelling)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).upper()] < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 64MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="source checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", type=Path, help="output directory (written atomically)")
    parser.add_argument("--to", required=True, choices=FORMATS,
                        help="bf16; block-FP8 (128x128) projections as Kimi-K2-Instruct; or INT4 routed experts "
                             "(compressed-tensors pack-quantized, groups of 32) as Kimi-K2-Thinking")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                        help="largest shard, e.g. 5GB (default), 500MB, 64MiB")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it already exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    src, dst = args.src, args.dst
    # a CheckpointError or missing file reaches kimi_k2.cli.main: "kimi-k2 convert: error: ...", exit status 1
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"DST {dst} is the source checkpoint; write to a new directory")
    if dst.is_dir() and any(dst.iterdir()) and not args.overwrite:
        raise CheckpointError(f"DST {dst} exists and is not empty; pass --overwrite to replace it")
    convert(src, dst, args.to, args.max_shard_size, progress=not args.no_progress)
    print(f"wrote {args.to} checkpoint to {dst}")
    return 0
