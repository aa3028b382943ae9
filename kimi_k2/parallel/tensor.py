"""Tensor-parallel MLA by heads: rank r of W computes heads [r*H/W, (r+1)*H/W) of every attention layer.

The latent projections (q_a_proj, kv_a_proj_with_mqa and their norms) are replicated: MLA's c_kv and k_pe are shared
by all heads, so every rank keeps the whole latent cache (as vLLM's MLA backend does). The head-major matrices are
split: rows of q_b_proj (or q_proj) and kv_b_proj, columns of o_proj. Each rank's o_proj gives a partial sum
    o = sum_r W_O[:, heads_r] attn_r,
which an all-reduce completes. A rank reads only its rows/columns of each split matrix (for block-FP8, the whole
128-row/column blocks that hold them: `kimi_k2.checkpoint.load_into` with `parts`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kimi_k2.checkpoint import Slice
from kimi_k2.config import K2Config
from kimi_k2.model.attention import MLA
from kimi_k2.model.cache import LatentCache

Slices = dict[str, Slice]  # tensor name -> this rank's part


class TPMLA(MLA):
    def __init__(self, config: K2Config, layer_idx: int, rank: int, world: int,
                 group: dist.ProcessGroup | None = None) -> None:
        H = config.num_attention_heads
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of size {world}")
        if H % world:
            raise ValueError(f"num_attention_heads={H} is not divisible by the tensor-parallel world size {world}")
        if config.attention_bias:
            raise ValueError("tensor-parallel MLA needs attention_bias=false (o_proj's bias would be summed W times)")
        super().__init__(config.replace(num_attention_heads=H // world), layer_idx)
        self.rank, self.world, self.group = rank, world, group

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None
    ) -> torch.Tensor:
        """x [B, S, D] (identical on every rank) -> [B, S, D], the sum over all ranks' heads."""
        part = super().forward(x, cos, sin, cache).float()  # reduced in fp32 whatever the model dtype
        dist.all_reduce(part, group=self.group)
        return part.to(x.dtype)

    def slices(self, prefix: str) -> Slices:
        h = self.n_heads  # heads per rank
        q = "q_proj" if self.q_lora_rank is None else "q_b_proj"
        per_q, per_kv = self.qk_head_dim, self.qk_nope_head_dim + self.v_head_dim
        return {
            f"{prefix}{q}.weight": Slice(0, self.rank * h * per_q, (self.rank + 1) * h * per_q),
            f"{prefix}kv_b_proj.weight": Slice(0, self.rank * h * per_kv, (self.rank + 1) * h * per_kv),
            f"{prefix}o_proj.weight": Slice(1, self.rank * h * self.v_head_dim, (self.rank + 1) * h * self.v_head_dim),
        }


def shard_attention(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Slices:
    """Replace every MLA of a K2ForCausalLM (best on the meta device) by a TPMLA -> the slices it must load."""
    slices: Slices = {}
    for i, block in enumerate(model.model.layers):
        with torch.device(block.self_attn.o_proj.weight.device):
            block.self_attn = TPMLA(model.config, i, rank, world, group)
        slices |= block.self_attn.slices(f"model.layers.{i}.self_attn.")
    return slices
