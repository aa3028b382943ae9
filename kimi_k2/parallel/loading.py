"""A rank's part of a checkpoint: its routed experts (and, with head-parallel attention, its heads), or with tensor
parallelism its 1/W of every split matrix, nothing else.

The model is built on the meta device, sharded (`shard_experts`, `shard_attention`), then materialized by the one
checkpoint loader, `kimi_k2.checkpoint.load_into`, which reads only the tensors and slices the rank holds (through the
index and the safetensors headers, memory-mapped), so no rank ever reads another's experts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kimi_k2.checkpoint import CheckpointReader, load_into
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.ops.triton.fp8_module import block_aligned, fp8_candidates, load_fp8_weights, to_fp8_resident
from kimi_k2.parallel.expert import shard_experts
from kimi_k2.parallel.tensor import shard_attention, shard_tensor_parallel


def load_expert_parallel(
    directory: str | os.PathLike[str], rank: int, world: int, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", group: dist.ProcessGroup | None = None, tp_attention: bool = False,
) -> tuple[K2ForCausalLM, list[str]]:
    """Rank `rank`'s part of the checkpoint in `directory`, for inference -> (model, names of the tensors it read).

    Every rank must run the same forwards on the same tokens (`DistributedRunner`): each dispatches 1/W of them.
    tp_attention: also split MLA by heads over the same ranks (`TPMLA`) instead of replicating it.
    """
    reader = CheckpointReader(directory)
    config = K2Config.from_pretrained(directory)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
        shard_experts(model, rank, world, group, same_input=True)
        slices = shard_attention(model, rank, world, group) if tp_attention else {}
    names = load_into(model, reader, dtype, device, strict=False, parts=slices)
    return model.eval(), names


def load_tensor_parallel(
    directory: str | os.PathLike[str], rank: int, world: int, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", group: dist.ProcessGroup | None = None, expert_parallel: bool = False,
    fp8_resident: bool = False,
) -> tuple[K2ForCausalLM, list[str]]:
    """Rank `rank`'s tensor-parallel part of the checkpoint in `directory` (`shard_tensor_parallel`: heads, MLP
    columns/rows, vocabulary rows; routed experts split the same way, or whole per rank with expert_parallel), read
    straight onto `device` -> (model, names of the tensors it read). Every rank runs the same forwards on the same
    tokens (`DistributedRunner`) and gets the full logits.
    fp8_resident: block-FP8 projections whose part is whole 128-blocks stay FP8 (`FP8Linear`, as on one GPU: K2's
    splits at TP 8 and 16 all are); the others are dequantized to `dtype`."""
    reader = CheckpointReader(directory)
    config = K2Config.from_pretrained(directory)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
        if expert_parallel:
            shard_experts(model, rank, world, group, same_input=True)
        slices = shard_tensor_parallel(model, rank, world, group, expert_parallel)
    fp8: list[str] = []
    if fp8_resident and reader.block == (128, 128):
        for name in fp8_candidates(model):
            w = f"{name}.weight"
            if reader.is_fp8(w) and (w not in slices or block_aligned(slices[w], reader.shape(w)[slices[w].dim])):
                fp8.append(name)
        to_fp8_resident(model, fp8)
    float_slices = {k: v for k, v in slices.items() if k.removesuffix(".weight") not in fp8}
    names = load_into(model, reader, dtype, device, strict=False, parts=float_slices)
    names += load_fp8_weights(model, reader, device, {k: v for k, v in slices.items() if k not in float_slices})
    return model.eval(), names
