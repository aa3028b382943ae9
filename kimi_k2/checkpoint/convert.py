"""Re-encode a checkpoint between bf16, block-FP8 and INT4 (`kimi-k2 convert`), streaming one tensor at a time.

INT4 is compressed-tensors pack-quantized as Kimi-K2-Thinking publishes it: the targets of the source's compressed-
tensors config (else K2-Thinking's: the routed experts) INT4 in groups of 32, everything else bf16. INT4 weights read
from an INT4 source are copied bit for bit; dequantized ones (to bf16, fp8) are q * scale, computed in fp32.

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
from kimi_k2.checkpoint.int4 import is_int4_target
from kimi_k2.checkpoint.layout import check_layout
from kimi_k2.checkpoint.reader import CheckpointReader, loaded_dtype
from kimi_k2.checkpoint.writer import ShardWriter, checkpoint_config, int4_config_for, is_weight_file, prepare
from kimi_k2.config import K2Config, check_quantization_config

FORMATS = ("bf16", "fp8", "int4")


def convert(src: Path, dst: Path, to: str, max_shard_size: int, progress: bool = True) -> None:
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r}; expected one of {FORMATS}")
    reader = CheckpointReader(src)
    config = K2Config.from_pretrained(src)
    check_layout(reader, config)
    fp8 = to == "fp8"
    int4 = int4_config_for(config) if to == "int4" else None
    quantized = (lambda n: is_int4_target(n, int4)) if int4 is not None else is_quantized_name if fp8 else None
    extra = [p for p in sorted(src.iterdir()) if not is_weight_file(p.name) and not p.name.startswith(".")]
    same = [n for n in reader if reader.is_int4(n) and int4 is not None and is_int4_target(n, int4)
            and reader.int4_group == check_quantization_config(int4)]  # already in the target layout: copied
    bar = tqdm(total=len(reader), unit="tensor", desc=f"to {to}", disable=not progress)
    with ShardWriter(dst, max_shard_size) as writer, bar:
        for name in same:
            writer.add(reader.stored_int4(name))
            bar.update()
        # quantizing wants the exact fp32 values; everything unquantized is written as bf16 (fp32 router bias)
        rest = set(reader) - set(same)
        for name, t in reader.tensors(dtype=torch.float32 if quantized else torch.bfloat16, names=rest):
            if not (quantized is not None and quantized(name) and t.ndim == 2):
                t = t.to(loaded_dtype(name, t.dtype, torch.bfloat16))
            writer.add(prepare(name, t, fp8, int4=int4))
            bar.update()
        writer.commit(checkpoint_config(config, fp8, torch.bfloat16, int4), extra)
