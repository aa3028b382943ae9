"""Which GPU layouts hold a K2-family model, and how many sequences of a given context fit (`kimi-k2 plan`).

Everything is computed from the config alone:
- weight bytes per component, block-FP8 as published (fp8 projections + one fp32 scale per 128x128 block; bf16
  embeddings, lm_head, norms, router; fp32 router bias) or bf16;
- the MLA latent cache: (kv_lora_rank + qk_rope_head_dim) values per token per layer. MLA shares the latent across
  heads, so tensor parallelism cannot split it: every TP rank keeps the whole latent of every sequence (vLLM's MLA
  backend, shared/reference/serving_anchors.md §2). Data-parallel attention keeps each sequence on one rank only.

Layouts (per rank = one GPU):
- TP=N: every matrix split N ways; all ranks hold the cache of all sequences.
- TP=t x PP=p: layers split into p stages of t-way TP; a rank holds the cache of its stage's layers.
- DP=N attention + EP=N experts: attention, dense MLP, shared experts and embeddings replicated, routed experts
  split N ways; each rank holds the cache of its own sequences.
`serve_command` turns the best layout `kimi-k2 serve` runs (one GPU, or TP=N, with whole experts per rank when they
divide) into its command line; pipeline stages and data-parallel attention are planned but not served.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kimi_k2.config import K2Config
from kimi_k2.model.info import kv_bytes_per_token, model_info

GB = 1e9
GiB = 2**30
# Memory per GPU as vendors state it (decimal GB).
GPUS: dict[str, float] = {
    "H200": 141 * GB, "H20": 96 * GB, "H100": 80 * GB, "H800": 80 * GB, "A100": 80 * GB, "B200": 180 * GB,
    "GB200": 186 * GB, "MI300X": 192 * GB, "MI325X": 256 * GB, "L40S": 48 * GB, "RTX4090": 24 * GB,
}

COMPONENTS = ("embed", "attention", "dense_mlp", "routed_experts", "shared_experts", "replicated")
# kimi_k2.model.info component -> how a layout places it ("replicated": small tensors every rank keeps whole)
_PLACEMENT = {"embeddings": "embed", "lm_head": "embed", "attention": "attention", "dense_mlp": "dense_mlp",
              "routed_experts": "routed_experts", "shared_experts": "shared_experts", "router": "replicated",
              "norms": "replicated"}


def component_bytes(cfg: K2Config, fp8: bool = True) -> dict[str, int]:
    """Weight bytes of the whole model by placement component (`model_info`'s closed form)."""
    info = model_info(cfg)
    out = dict.fromkeys(COMPONENTS, 0)
    for name, n in (info.fp8_component_bytes if fp8 else info.bf16_component_bytes).items():
        out[_PLACEMENT[name]] += n
    return out


@dataclass
class Layout:
    name: str
    weights_per_rank: float  # bytes
    kv_per_token_per_rank: float  # bytes each rank stores per cached token of a sequence it holds
    sequence_groups: int  # groups of ranks holding different sequences: 1 for TP and TP x PP, N for DP
    ranks: int
    free_per_rank: float = 0.0
    seqs_per_rank: int = 0
    max_seqs: int = 0
    fits: bool = False
    why: str = ""


@dataclass
class Plan:
    model: str
    gpu: str
    n_gpus: int
    context: int
    concurrency: int
    fp8: bool
    total_weight_bytes: int
    kv_bytes_token: int
    usable_per_gpu: float
    layouts: list[Layout]

    @property
    def fits(self) -> bool:
        return any(lay.fits for lay in self.layouts)


def _layouts(cfg: K2Config, parts: dict[str, int], n: int, kv_tok: int, gpus_per_node: int) -> list[Layout]:
    total = sum(parts.values())
    out: list[Layout] = []
    heads, experts = cfg.num_attention_heads, cfg.n_routed_experts or 0
    if heads % n == 0:
        out.append(Layout(f"TP={n}", (total - parts["replicated"]) / n + parts["replicated"], kv_tok, 1, n))
    for t in sorted({gpus_per_node, 8, 4, 2}):
        p = n // t
        if p < 2 or t * p != n or heads % t or p > cfg.num_hidden_layers:
            continue
        per_layer = (total - parts["embed"] - parts["replicated"]) / cfg.num_hidden_layers
        stage_layers = math.ceil(cfg.num_hidden_layers / p)
        weights = per_layer * stage_layers / t + parts["embed"] / 2 / t + parts["replicated"]
        out.append(Layout(f"TP={t} x PP={p}", weights, kv_tok * stage_layers / cfg.num_hidden_layers, 1, n))
    if experts and experts % n == 0 and n > 1:
        weights = total - parts["routed_experts"] + parts["routed_experts"] / n
        out.append(Layout(f"DP={n} attention + EP={n}", weights, kv_tok, n, n))
    return out


def make_plan(cfg: K2Config, gpu: str, n_gpus: int, context: int, concurrency: int = 1, fp8: bool = True,
              gpu_memory_utilization: float = 0.9, reserve_gib: float = 2.0, kv_dtype_bytes: int = 2,
              gpus_per_node: int = 8, model_name: str = "model") -> Plan:
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(sorted(GPUS))}")
    if n_gpus < 1 or context < 1 or concurrency < 1:
        raise ValueError("GPU count, context and concurrency must be >= 1")
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context {context} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    parts = component_bytes(cfg, fp8)
    kv_tok = kv_bytes_per_token(cfg, kv_dtype_bytes)
    usable = GPUS[gpu] * gpu_memory_utilization - reserve_gib * GiB
    layouts = _layouts(cfg, parts, n_gpus, kv_tok, gpus_per_node)
    if n_gpus == 1:
        layouts = [Layout("single GPU", sum(parts.values()), kv_tok, 1, 1)]
    for lay in layouts:
        lay.free_per_rank = usable - lay.weights_per_rank
        per_seq = lay.kv_per_token_per_rank * context
        lay.seqs_per_rank = max(0, int(lay.free_per_rank // per_seq)) if lay.free_per_rank > 0 else 0
        lay.max_seqs = lay.seqs_per_rank * lay.sequence_groups
        lay.fits = lay.max_seqs >= concurrency
        if lay.free_per_rank <= 0:
            lay.why = "weights alone exceed usable memory"
        elif not lay.fits:
            lay.why = f"only {lay.max_seqs} sequence(s) of {context} tokens fit"
    return Plan(model_name, gpu, n_gpus, context, concurrency, fp8, sum(parts.values()), kv_tok, usable, layouts)


def smallest_unit(cfg: K2Config, gpu: str, context: int, concurrency: int = 1, **kw: object) -> Plan | None:
    """The fewest GPUs (1, 2, 4, 8, then whole 8-GPU nodes) with a layout that fits."""
    for n in [1, 2, 4] + list(range(8, 257, 8)):
        plan = make_plan(cfg, gpu, n, context, concurrency, **kw)  # type: ignore[arg-type]
        if plan.fits:
            return plan
    return None


def serve_command(plan: Plan, cfg: K2Config, gpus_per_node: int = 8, gpu_memory_utilization: float = 0.9
                  ) -> str | None:
    """The `kimi-k2 serve` command of the layout that fits with the most sequences among those it runs (one GPU,
    TP=N), or None when none of those fits."""
    runnable = [lay for lay in plan.layouts if lay.fits and (lay.name == "single GPU" or lay.name.startswith("TP=")
                                                             and " x " not in lay.name)]
    if not runnable:
        return None
    lay = max(runnable, key=lambda lay: lay.max_seqs)
    n = lay.ranks
    seqs = max(plan.concurrency, min(lay.max_seqs, 256))
    args = [plan.model, f"--max-model-len {plan.context}", f"--max-num-seqs {seqs}",
            f"--gpu-memory-utilization {gpu_memory_utilization}"]
    if n == 1:
        return " ".join(["kimi-k2 serve", *args])
    args.insert(1, f"--tensor-parallel-size {n}")
    if cfg.n_routed_experts and cfg.n_routed_experts % n == 0:
        args.insert(2, "--enable-expert-parallel")
    if n <= gpus_per_node:
        launch = f"torchrun --nproc-per-node {n}"
    else:
        nodes = -(-n // gpus_per_node)
        launch = (f"torchrun --nnodes {nodes} --node-rank $NODE_RANK --nproc-per-node {gpus_per_node} "
                  "--rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500")
    return " ".join([launch, "-m kimi_k2.cli serve", *args])


def _fmt(b: float) -> str:
    return f"{b / GB:,.1f} GB"


def render(plan: Plan, cfg: K2Config, gpu_memory_utilization: float = 0.9) -> str:
    lines = [
        f"{plan.model} on {plan.n_gpus} x {plan.gpu} ({_fmt(GPUS[plan.gpu])} each), context {plan.context:,}, "
        f"{plan.concurrency} concurrent sequence(s), weights {'block-FP8' if plan.fp8 else 'bf16'}",
        f"weights total: {_fmt(plan.total_weight_bytes)} ({plan.total_weight_bytes / GiB:,.1f} GiB)",
        f"MLA latent cache: ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) x {cfg.num_hidden_layers} layers x 2 B = "
        f"{plan.kv_bytes_token:,} B/token -> {_fmt(plan.kv_bytes_token * plan.context)} per {plan.context:,}-token "
        f"sequence",
        f"usable per GPU: {_fmt(GPUS[plan.gpu])} x utilization - reserve = {_fmt(plan.usable_per_gpu)}",
        "",
    ]
    for lay in plan.layouts:
        per_seq = lay.kv_per_token_per_rank * plan.context
        lines.append(
            f"{lay.name:<28} weights/rank {_fmt(lay.weights_per_rank):>10}  free {_fmt(lay.free_per_rank):>10}  "
            f"KV/seq/rank {_fmt(per_seq):>9}  max seqs {lay.max_seqs:>5}  {'FITS' if lay.fits else 'no: ' + lay.why}"
        )
    if not plan.layouts:
        lines.append(f"no layout: {plan.n_gpus} divides neither the {cfg.num_attention_heads} heads nor the "
                     f"{cfg.n_routed_experts} experts")
    command = serve_command(plan, cfg, gpu_memory_utilization=gpu_memory_utilization)
    if command is not None:
        lines += ["", "serve it with (one process per GPU; on several nodes run it on each, NODE_RANK 0..):",
                  f"  {command}"]
    elif plan.fits:
        lines += ["", "kimi-k2 serve runs one GPU or TP=N layouts; none of those fits here"]
    return "\n".join(lines)
