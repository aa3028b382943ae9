"""Re-encode a checkpoint between block-FP8 and bf16 (`kimi-k2 convert`), streaming one tensor at a time.

Holds at most one source tensor plus one output shard in memory, so it works for checkpoints larger than RAM.
Before anything is written the source is checked: every tensor its config.json implies, no other, with the implied
shapes (`layout.check_layout`), and every safetensors file whole (`read_header`); a failed check writes nothing.
The non-weight files of SRC (tokenizer, chat template, ...) are copied; config.json gets the new
quantization_config and torch_dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from kimi_k2.checkpoint.fp8 import is_quantized_name
from kimi_k2.checkpoint.layout import check_layout
from kimi_k2.checkpoint.reader import CheckpointReader, loaded_dtype
from kimi_k2.checkpoint.writer import ShardWriter, checkpoint_config, is_weight_file, prepare
from kimi_k2.config import K2Config


def convert(src: Path, dst: Path, to: str, max_shard_size: int, progress: bool = True) -> None:
    if to not in ("bf16", "fp8"):
        raise ValueError(f"unknown target format {to!r}; expected bf16 or fp8")
    reader = CheckpointReader(src)
    config = K2Config.from_pretrained(src)
    check_layout(reader, config)
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
