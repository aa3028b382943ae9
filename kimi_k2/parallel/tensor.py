"""Tensor parallelism for inference (Megatron-LM's split, as vLLM serves DeepSeek-V3/K2): every rank holds 1/W of
each matrix and sees the same tokens; one all-reduce (or all-gather) completes each layer's output.

MLA by heads (`TPMLA`): rank r of W computes heads [r*H/W, (r+1)*H/W) of every attention layer. The latent
projections (q_a_proj, kv_a_proj_with_mqa and their norms) are replicated: MLA's c_kv and k_pe are shared by all
heads, so every rank keeps the whole latent cache (as vLLM's MLA backend does). The head-major matrices are split:
rows of q_b_proj (or q_proj) and kv_b_proj, columns of o_proj. Each rank's o_proj gives a partial sum
    o = sum_r W_O[:, heads_r] attn_r,
which an all-reduce completes.
SwiGLU MLPs by the intermediate dimension (`TPMLP`: the dense MLP, the shared expert, and without expert parallelism
each routed expert, `TPMoE`): rows of gate_proj and up_proj, columns of down_proj; silu(g) * u is elementwise, so
    down(x) = sum_r W_down[:, I_r] (silu(W_gate[I_r] x) * W_up[I_r] x)
and one all-reduce per MLP (per MoE block: the router is replicated and the weighted sum is linear in the parts).
Vocabulary by rows (`VocabParallelEmbedding`, `VocabParallelLMHead`): rank r holds ids [r*ceil(V/W), ...); a token's
embedding comes from the one rank that holds it (the others add zeros, all-reduce), the logits are all-gathered.
A rank reads only its rows/columns of each split matrix (for block-FP8, the whole 128-row/column blocks that hold
them: `kimi_k2.checkpoint.load_into` with `parts`). Reductions run in fp32 whatever the model dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kimi_k2.checkpoint import Slice
from kimi_k2.config import K2Config
from kimi_k2.model.attention import MLA
from kimi_k2.model.cache import LatentCache
from kimi_k2.model.layers import MLP, Embedding, Linear
from kimi_k2.model.moe import MoE

Slices = dict[str, Slice]  # tensor name -> this rank's part


def all_reduce(part: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum of every rank's `part`, reduced in fp32, as part.dtype."""
    full = part.float()
    dist.all_reduce(full, group=group)
    return full.to(part.dtype)


def check_split(what: str, n: int, rank: int, world: int) -> int:
    """n / world, or a ValueError naming `what` when it does not divide."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of size {world}")
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the tensor-parallel world size {world}")
    return n // world


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
        return all_reduce(super().forward(x, cos, sin, cache), self.group)

    def slices(self, prefix: str) -> Slices:
        h = self.n_heads  # heads per rank
        q = "q_proj" if self.q_lora_rank is None else "q_b_proj"
        per_q, per_kv = self.qk_head_dim, self.qk_nope_head_dim + self.v_head_dim
        return {
            f"{prefix}{q}.weight": Slice(0, self.rank * h * per_q, (self.rank + 1) * h * per_q),
            f"{prefix}kv_b_proj.weight": Slice(0, self.rank * h * per_kv, (self.rank + 1) * h * per_kv),
            f"{prefix}o_proj.weight": Slice(1, self.rank * h * self.v_head_dim, (self.rank + 1) * h * self.v_head_dim),
        }


class TPMLP(MLP):
    """Rank's 1/W of a SwiGLU MLP's intermediate dimension; the output is all-reduced."""

    def __init__(self, dim: int, inter_dim: int, rank: int, world: int, group: dist.ProcessGroup | None = None
                 ) -> None:
        self.part = check_split("intermediate size", inter_dim, rank, world)
        super().__init__(dim, self.part)
        self.rank, self.group = rank, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.group)

    def slices(self, prefix: str) -> Slices:
        return _mlp_slices(prefix, self.rank, self.part)


class TPMoE(MoE):
    """A MoE block with every routed expert and the shared expert split by their intermediate dimension (no expert
    parallelism): the replicated router picks the same experts on every rank, each rank adds its parts, one
    all-reduce."""

    def __init__(self, config: K2Config, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        inter = config.moe_intermediate_size
        self.part = check_split("moe_intermediate_size", inter, rank, world)
        super().__init__(config.replace(moe_intermediate_size=self.part))
        self.rank, self.world, self.group = rank, world, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(super().forward(x), self.group)

    def slices(self, prefix: str) -> Slices:
        out: Slices = {}
        for e in range(self.n_experts):
            out |= _mlp_slices(f"{prefix}experts.{e}.", self.rank, self.part)
        shared = self.shared_experts.gate_proj.out_features  # n_shared * part
        return out | _mlp_slices(f"{prefix}shared_experts.", self.rank, shared)


def _mlp_slices(prefix: str, rank: int, part: int) -> Slices:
    rows = Slice(0, rank * part, (rank + 1) * part)
    return {f"{prefix}gate_proj.weight": rows, f"{prefix}up_proj.weight": rows,
            f"{prefix}down_proj.weight": Slice(1, rows.start, rows.stop)}


def vocab_range(vocab: int, rank: int, world: int) -> range:
    """The token ids rank `rank` of `world` holds: ceil(vocab / world) each, the last rank fewer."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of size {world}")
    per = -(-vocab // world)
    if per * (world - 1) >= vocab:
        raise ValueError(f"vocab_size={vocab} is too small to split over {world} ranks")
    return range(rank * per, min(vocab, (rank + 1) * per))


class VocabParallelEmbedding(Embedding):
    def __init__(self, vocab: int, dim: int, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        self.ids = vocab_range(vocab, rank, world)
        super().__init__(len(self.ids), dim)
        self.group = group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.ids.start
        held = (local >= 0) & (local < len(self.ids))
        h = F.embedding(local.clamp(0, len(self.ids) - 1), self.weight) * held[..., None].to(self.weight.dtype)
        return all_reduce(h, self.group)

    def slices(self, name: str) -> Slices:
        return {name: Slice(0, self.ids.start, self.ids.stop)}


class VocabParallelLMHead(Linear):
    """Rank's rows of lm_head; every rank gets the full logits (all-gathered, padded to equal parts)."""

    def __init__(self, dim: int, vocab: int, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        self.ids, self.vocab, self.world = vocab_range(vocab, rank, world), vocab, world
        super().__init__(dim, len(self.ids), bias=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [..., V_r]
        per = -(-self.vocab // self.world)
        y = F.pad(y, (0, per - y.shape[-1])).contiguous()
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab]

    def slices(self, name: str) -> Slices:
        return {name: Slice(0, self.ids.start, self.ids.stop)}


def shard_tensor_parallel(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None,
                          expert_parallel: bool = False) -> Slices:
    """Make a K2ForCausalLM (best on the meta device) tensor parallel over `world` ranks in place -> the slices it
    must load: attention by heads, dense MLPs and shared experts by columns/rows, vocabulary by rows, and the routed
    experts either split the same way (`TPMoE`) or, with expert_parallel, whole experts per rank
    (`kimi_k2.parallel.expert.ExpertParallelMoE`, the caller's `shard_experts`: call it first)."""
    from kimi_k2.parallel.expert import ExpertParallelMoE

    config = model.config
    slices = shard_attention(model, rank, world, group)
    for i, block in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp."
        with torch.device(block.input_layernorm.weight.device):
            if isinstance(block.mlp, ExpertParallelMoE):
                shared = block.mlp.shared_experts
                block.mlp.shared_experts = TPMLP(config.hidden_size, shared.gate_proj.out_features, rank, world, group)
                slices |= block.mlp.shared_experts.slices(f"{prefix}shared_experts.")
            elif isinstance(block.mlp, MoE):
                if expert_parallel:
                    raise ValueError("expert_parallel: shard the routed experts (shard_experts) before this")
                block.mlp = TPMoE(config, rank, world, group)
                slices |= block.mlp.slices(prefix)
            else:
                block.mlp = TPMLP(config.hidden_size, config.intermediate_size, rank, world, group)
                slices |= block.mlp.slices(prefix)
    with torch.device(model.lm_head.weight.device):
        model.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, rank, world, group)
        model.lm_head = VocabParallelLMHead(config.hidden_size, config.vocab_size, rank, world, group)
    return slices | model.model.embed_tokens.slices("model.embed_tokens.weight") | model.lm_head.slices(
        "lm_head.weight")


def shard_attention(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None) -> Slices:
    """Replace every MLA of a K2ForCausalLM (best on the meta device) by a TPMLA -> the slices it must load."""
    slices: Slices = {}
    for i, block in enumerate(model.model.layers):
        with torch.device(block.self_attn.o_proj.weight.device):
            block.self_attn = TPMLA(model.config, i, rank, world, group)
        slices |= block.self_attn.slices(f"model.layers.{i}.self_attn.")
    return slices
