"""The two building blocks every K2 layer shares: RMSNorm and the SwiGLU feed-forward, plus `derived`, the cache of
inference-only weight layouts (fused projections, fp32 absorbed matrices) rebuilt whenever a source weight changes."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


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


def derived(owner: nn.Module, name: str, sources: list[torch.Tensor | None],
            build: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`build()` computed from `sources`, cached on `owner` (not in its state_dict) until a source changes.

    A source changes when it is replaced (load, `.to()`: new data_ptr) or updated in place (optimizer step,
    QK-Clip, `copy_`: the version counter moves), so the cache never serves stale weights. Inference only: the result
    does not carry gradients back to the sources.
    """
    key = [(t.data_ptr(), t._version) for t in sources if t is not None]
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        owner.__dict__[name] = cached
    return cached[1]


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalized in fp32 and cast back before the weight (as HF DeepseekV3)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one kernel, same math in fp32
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)): the dense MLP of the first layers, each routed expert, the shared experts.

    With `fuse` (dense and shared MLPs) inference runs gate and up as one matmul over a cached [gate; up] weight;
    routed experts keep separate calls, since a fused copy of every expert would double the model's memory.
    """

    def __init__(self, dim: int, inter_dim: int, fuse: bool = True) -> None:
        super().__init__()
        self.fuse = fuse
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse and not torch.is_grad_enabled():
            w = derived(self, "_gate_up", [self.gate_proj.weight, self.up_proj.weight],
                        lambda: torch.cat([self.gate_proj.weight, self.up_proj.weight]))
            gate, up = F.linear(x, w).chunk(2, dim=-1)
        else:
            gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)
