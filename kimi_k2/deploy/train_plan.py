"""Training memory per GPU of a K2-family model under FSDP2 + expert parallelism with MuonClip (`kimi-k2 plan
--train`), from the config alone.

Sharded state, per parameter element of the whole model, split over the N ranks (every element lives on one rank):
    fp32 master 4 B + fp32 gradient 4 B + optimizer state: Muon momentum 4 B (hidden matrices, experts, router) or
    AdamW moments 8 B (embeddings, lm_head, norms); (the router's correction bias, a small buffer, is left out).
Transient, per rank, at the peak (backward of the largest block):
    gathered parameters in param_dtype: the root unit (embeddings, final norm, lm_head) for the whole step, and two
        decoder blocks (the running one and the prefetched one), each its attention, router, shared and dense MLP
        plus its E / ep local experts;
    their unsharded gradients in fp32 before the reduce-scatter: the root unit and one block;
    Newton-Schulz: U and O of about one largest Muon matrix in the NS dtype (`kimi_k2.train.dist_muon`).
Activations depend on micro-batch, sequence length and recomputation and are not modelled: `reserve_gib` holds them.
Data parallelism (DDP) keeps the whole state on every rank: the first line of the table, for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kimi_k2.config import K2Config
from kimi_k2.deploy.plan import GB, GPUS, GiB
from kimi_k2.model.info import model_info

MASTER, GRAD, MUON, ADAMW = 4, 4, 4, 8  # bytes per element


@dataclass
class TrainLayout:
    name: str
    ep: int
    sharded: float  # bytes per rank
    gathered: float
    unsharded_grads: float
    newton_schulz: float
    fits: bool = False

    @property
    def per_gpu(self) -> float:
        return self.sharded + self.gathered + self.unsharded_grads + self.newton_schulz


@dataclass
class TrainPlan:
    model: str
    gpu: str
    n_gpus: int
    total_params: int
    state_bytes: int  # the whole model's parameters + gradients + optimizer state
    usable_per_gpu: float
    layouts: list[TrainLayout]

    @property
    def best(self) -> TrainLayout | None:
        fitting = [lay for lay in self.layouts if lay.fits and lay.ep > 0]
        return min(fitting, key=lambda lay: lay.per_gpu) if fitting else None

    @property
    def fits(self) -> bool:
        return self.best is not None


def state_bytes(cfg: K2Config) -> int:
    """Parameters + gradients + optimizer state of the whole model (fp32 masters, MuonClip's split)."""
    c = model_info(cfg).components
    attention_biases = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.hidden_size \
        if cfg.attention_bias else 0
    adamw = c["embeddings"] + c["lm_head"] + c["norms"] + attention_biases * cfg.num_hidden_layers
    bias = cfg.n_routed_experts or 0  # per MoE layer: the correction-bias buffer ("router"), not a parameter
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    muon = sum(c.values()) - adamw - bias * n_moe
    return muon * (MASTER + GRAD + MUON) + adamw * (MASTER + GRAD + ADAMW)


def _block_params(cfg: K2Config, ep: int) -> int:
    """Parameters one rank gathers for the largest decoder block: all of it but the other ranks' routed experts."""
    c, L = model_info(cfg).components, cfg.num_hidden_layers
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    per_layer = (c["attention"] + c["norms"] - cfg.hidden_size) / L  # final norm is the root's
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe = (c["shared_experts"] + c["router"]) / max(n_moe, 1) + (cfg.n_routed_experts or 0) // ep * expert
    dense = c["dense_mlp"] / max(L - n_moe, 1)
    return int(per_layer + max(moe if n_moe else 0, dense if n_moe < L else 0))


def _largest_muon_matrix(cfg: K2Config) -> int:
    H, D = cfg.num_attention_heads, cfg.hidden_size
    shapes = [(cfg.kv_lora_rank + cfg.qk_rope_head_dim, D), (H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                                              cfg.kv_lora_rank), (D, H * cfg.v_head_dim),
              (cfg.intermediate_size, D), (cfg.moe_intermediate_size * (cfg.n_shared_experts or 1), D)]
    shapes.append((H * cfg.qk_head_dim, cfg.q_lora_rank or D))
    if cfg.q_lora_rank:
        shapes.append((cfg.q_lora_rank, D))
    return max(math.prod(s) for s in shapes)


def make_train_plan(cfg: K2Config, gpu: str, n_gpus: int, param_bytes: int = 2, ns_bytes: int = 4,
                    gpu_memory_utilization: float = 0.9, reserve_gib: float = 8.0,
                    model_name: str = "model") -> TrainPlan:
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(GPUS))}")
    if n_gpus < 1:
        raise ValueError("GPU count must be >= 1")
    info = model_info(cfg)
    state = state_bytes(cfg)
    root = info.components["embeddings"] + info.components["lm_head"] + cfg.hidden_size
    ns = 2 * _largest_muon_matrix(cfg) * ns_bytes
    usable = GPUS[gpu] * gpu_memory_utilization - reserve_gib * GiB
    E = cfg.n_routed_experts or 0
    # DDP: everything on every rank, the forward in param_dtype from an autocast copy aside
    layouts = [TrainLayout("DDP (replicated)", 0, state, 0.0, 0.0, 0.0)]
    for ep in [d for d in range(1, n_gpus + 1) if n_gpus % d == 0 and (E % d == 0 if E else d == 1)]:
        block = _block_params(cfg, ep)
        name = f"FSDP2 dp_shard={n_gpus}" + (f" ep={ep}" if E else "")
        layouts.append(TrainLayout(name, ep, state / n_gpus, (root + 2 * block) * param_bytes,
                                   (root + block) * GRAD, ns))
    for lay in layouts:
        lay.fits = lay.per_gpu <= usable
    return TrainPlan(model_name, gpu, n_gpus, info.total_params, state, usable, layouts)


def smallest_train_unit(cfg: K2Config, gpu: str, **kw: object) -> TrainPlan | None:
    """The fewest GPUs (1, 2, 4, then whole 8-GPU nodes, up to 4096) with an FSDP2 layout that fits."""
    for n in [1, 2, 4] + list(range(8, 4097, 8)):
        plan = make_train_plan(cfg, gpu, n, **kw)  # type: ignore[arg-type]
        if plan.fits:
            return plan
    return None


def _fmt(b: float) -> str:
    return f"{b / GB:,.1f} GB" if b >= 0.1 * GB else f"{b / 1e6:,.1f} MB"


def render_train(plan: TrainPlan) -> str:
    lines = [
        f"training {plan.model} ({plan.total_params / 1e9:,.2f} B parameters) on {plan.n_gpus} x {plan.gpu} "
        f"({_fmt(GPUS[plan.gpu])} each)",
        f"parameters + gradients + MuonClip state: {_fmt(plan.state_bytes)} in all "
        f"(fp32 master 4 + gradient 4 + Muon 4 / AdamW 8 B per element)",
        f"usable per GPU: {_fmt(GPUS[plan.gpu])} x utilization - reserve (activations) = {_fmt(plan.usable_per_gpu)}",
        "",
        f"{'layout':<30} {'sharded':>10} {'gathered':>10} {'grads':>10} {'NS':>9} {'per GPU':>10}",
    ]
    best = plan.best
    for lay in plan.layouts:
        mark = "FITS" if lay.fits else "no"
        if lay is best:
            mark = "FITS (smallest per GPU)"
        lines.append(f"{lay.name:<30} {_fmt(lay.sharded):>10} {_fmt(lay.gathered):>10} "
                     f"{_fmt(lay.unsharded_grads):>10} {_fmt(lay.newton_schulz):>9} {_fmt(lay.per_gpu):>10}  {mark}")
    lines.append("")
    lines.append(f"recipe: [parallel] dp_shard = {plan.n_gpus}, ep = {best.ep}" if best is not None else
                 f"no FSDP2 layout of {plan.n_gpus} x {plan.gpu} holds the training state")
    return "\n".join(lines)
