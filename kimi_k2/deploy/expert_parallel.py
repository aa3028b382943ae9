"""Expert parallelism (EP) with torch.distributed: rank r of W holds routed experts [r*E/W, (r+1)*E/W) of every MoE
layer; the rest (embeddings, dense MLP, router, shared expert, lm_head) is replicated, and MLA attention is either
replicated or split by heads over the same ranks (`tensor_parallel.py`).

All ranks see the same tokens (the DistributedRunner feeds every rank the same step, and attention, replicated or
all-reduced, leaves every rank the whole hidden state), so each rank dispatches only its 1/W slice of the tokens and
the slices are all-gathered after the MoE (`kimi_k2.model.expert_parallel`, `same_input=True`).
Each rank reads only its own tensors from the checkpoint (through the index and `CheckpointReader`, memory-mapped).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kimi_k2.checkpoint import CheckpointReader
from kimi_k2.config import K2Config
from kimi_k2.deploy.loading import load_present
from kimi_k2.deploy.tensor_parallel import shard_attention
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model import expert_parallel as model_expert_parallel


def shard_experts(model: K2ForCausalLM, rank: int, world: int, group: dist.ProcessGroup | None = None
                  ) -> K2ForCausalLM:
    """Every `MoE` of `model` (best built on the meta device) becomes rank's slice, fed the same tokens on all ranks."""
    return model_expert_parallel.shard_experts(model, rank, world, group, same_input=True)


def load_expert_parallel(
    directory: str | os.PathLike[str], rank: int, world: int, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", group: dist.ProcessGroup | None = None, tp_attention: bool = False,
) -> tuple[K2ForCausalLM, list[str]]:
    """Rank `rank`'s part of the checkpoint in `directory` -> (model, names of the tensors it read).

    tp_attention: also split MLA by heads over the same ranks (`tensor_parallel.TPMLA`) instead of replicating it.
    """
    reader = CheckpointReader(directory)
    config = K2Config.from_pretrained(directory)
    with torch.device("meta"):
        model = shard_experts(K2ForCausalLM(config), rank, world, group)
        slices = shard_attention(model, rank, world, group) if tp_attention else {}
    names = load_present(model, reader, dtype, device, slices)
    return model.eval(), names
