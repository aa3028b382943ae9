"""`kimi-k2 convert SRC DST --to {bf16,fp8}`: re-encode a checkpoint, streaming one tensor at a time.

Holds at most one source tensor plus one output shard in memory, so it works for checkpoints larger than RAM.
The non-weight files of SRC (tokenizer, chat template, ...) are copied; config.json gets the new
quantization_config and torch_dtype.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from tqdm import tqdm

from kimi_k2.checkpoint.fp8 import is_quantized_name
from kimi_k2.checkpoint.reader import CheckpointError, CheckpointReader, loaded_dtype
from kimi_k2.checkpoint.writer import ShardWriter, checkpoint_config, is_weight_file, prepare
from kimi_k2.config import K2Config

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9, '64MiB' -> 64 * 2**20, '1000' -> 1000 (Hugging Face `max_shard_size` spelling)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in _UNITS or float(m.group(1)) * _UNITS[m.group(2).upper()] < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 64MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def convert(src: Path, dst: Path, to: str, max_shard_size: int, progress: bool = True) -> None:
    if to not in ("bf16", "fp8"):
        raise ValueError(f"unknown target format {to!r}; expected bf16 or fp8")
    reader = CheckpointReader(src)
    config = K2Config.from_pretrained(src)
    fp8 = to == "fp8"
    extra = [p for p in sorted(src.iterdir()) if not is_weight_file(p.name) and not p.name.startswith(".")]
    with ShardWriter(dst, max_shard_size) as writer:
        # quantizing wants the exact fp32 values; everything unquantized is written as bf16 (fp32 router bias)
        tensors = reader.tensors(dtype=torch.float32 if fp8 else torch.bfloat16)
        for name, t in tqdm(tensors, total=len(reader), unit="tensor", desc=f"to {to}", disable=not progress):
            if not (fp8 and is_quantized_name(name) and t.ndim == 2):
                t = t.to(loaded_dtype(name, t.dtype, torch.bfloat16))
            writer.add(prepare(name, t, fp8))
        writer.commit(checkpoint_config(config, fp8, torch.bfloat16), extra)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="source checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", type=Path, help="output directory (written atomically)")
    parser.add_argument("--to", required=True, choices=["bf16", "fp8"], help="bf16, or block-FP8 (128x128) weights")
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
