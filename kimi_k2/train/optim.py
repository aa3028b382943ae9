"""The optimizer of a recipe: MuonClip (K2 split, QK-Clip after each step) or AdamW on every parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kimi_k2.train.muonclip import MuonClip
from kimi_k2.train.param_groups import param_groups
from kimi_k2.train.qk_clip import QKClip
from kimi_k2.train.recipe import OptimSection

# called after optimizer.step() with the step's per-head max logits [layers, heads] (max over micro-batches and ranks)
QKClipFn = Callable[[torch.Tensor], dict[str, Any]]


def build_optimizer(model: nn.Module, cfg: OptimSection) -> tuple[torch.optim.Optimizer, QKClipFn | None]:
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adamw":
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        return opt, None
    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt = MuonClip(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, betas=betas, eps=cfg.eps)
    if cfg.qk_clip_tau is None:
        return opt, None
    clip = QKClip(model, cfg.qk_clip_tau)
    attn = [m for _, m in clip.layers]

    def apply(max_logits: torch.Tensor) -> dict[str, Any]:
        for a, s in zip(attn, max_logits, strict=True):
            a.max_logits = s
        stats = clip.apply()
        return {"heads_clipped": stats.heads_clipped.tolist()}

    return opt, apply
