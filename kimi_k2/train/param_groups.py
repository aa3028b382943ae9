"""The K2 split of a model's parameters into MuonClip groups, by name (KellerJordan/Muon README, Moonlight toy_train):

    embed_tokens, lm_head, every 1-D parameter (RMSNorm gains, biases)  -> AdamW   (use_muon=False)
    every other 2-D weight (attention, dense and expert MLPs, router)   -> Muon    (use_muon=True)
    e_score_correction_bias (the aux-free routing bias, a buffer)       -> never optimized

Weight decay applies to both kinds: Moonlight App. D finds decay on the RMSNorm gains needed for stability.
With `per_head=True`, q_b_proj (or q_proj) and kv_b_proj are orthogonalised one head's row block at a time
(block_rows = qk_nope+qk_rope and qk_nope+v), as torchtitan's Kimi recipe does.
"""

from __future__ import annotations

from typing import Any

from torch import nn

ADAMW_NAMES = ("embed_tokens", "lm_head")
NEVER_OPTIMIZED = ("e_score_correction_bias",)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.1,
    *,
    adamw_lr: float | None = None,
    per_head: bool = False,
) -> list[dict[str, Any]]:
    """MuonClip param groups for a K2/DeepSeek-V3 model; each group also lists its parameter `names`."""
    q_rows = k_rows = None
    if per_head:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"per_head Muon needs model.config (head sizes); {type(model).__name__} has none")
        q_rows = config.qk_nope_head_dim + config.qk_rope_head_dim
        k_rows = config.qk_nope_head_dim + config.v_head_dim

    groups: dict[str, dict[str, Any]] = {
        "muon": dict(use_muon=True, block_rows=None),
        "muon_q_heads": dict(use_muon=True, block_rows=q_rows),
        "muon_kv_heads": dict(use_muon=True, block_rows=k_rows),
        "adamw": dict(use_muon=False, lr=lr if adamw_lr is None else adamw_lr),
    }
    for g in groups.values():
        g.setdefault("lr", lr)
        g.update(weight_decay=weight_decay, params=[], names=[])

    for name, p in model.named_parameters():
        if not p.requires_grad or name.rsplit(".", 1)[-1] in NEVER_OPTIMIZED:
            continue
        if p.ndim < 2 or any(part in ADAMW_NAMES for part in name.split(".")):
            key = "adamw"
        elif p.ndim > 3:
            raise ValueError(f"parameter {name} has shape {tuple(p.shape)}; Muon takes 2-D matrices or 3-D stacks")
        elif per_head and name.endswith((".q_b_proj.weight", ".q_proj.weight")):
            key = "muon_q_heads"
        elif per_head and name.endswith(".kv_b_proj.weight"):
            key = "muon_kv_heads"
        else:
            key = "muon"
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [g for g in groups.values() if g["params"]]


def freeze(model: nn.Module, patterns: list[str]) -> None:
    """Turn off gradients for the parameters whose names contain one of `patterns`. A pattern that matches no
    parameter is an error (a typo would otherwise silently train everything)."""
    named = list(model.named_parameters())
    for pattern in patterns:
        if not any(pattern in n for n, _ in named):
            raise ValueError(f"[train] freeze: {pattern!r} matches no parameter of the model (names look like "
                             f"{named[0][0]!r}, {named[-1][0]!r})")
    for name, p in named:
        if any(pattern in name for pattern in patterns):
            p.requires_grad_(False)
