"""The two building blocks every K2 layer shares: RMSNorm and the SwiGLU feed-forward."""

from __future__ import annotations

import torch
from torch import nn

from .functional import rms_norm, swiglu


class Linear(nn.Linear):
    """nn.Linear that skips its random init on the meta device (K2 has 69k of them; from_config/load fill them)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Embedding(nn.Embedding):
    """nn.Embedding that skips its random init on the meta device (where normal_ would import torch._dynamo)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)): the dense MLP of the first layers, each routed expert, the shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
