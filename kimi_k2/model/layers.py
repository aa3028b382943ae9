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


# Inference caches (fused / transposed / fp32 copies of weights) pay where per-call overhead, not memory bandwidth,
# bounds a matmul: small widths. Bigger weights keep the plain path, so a K2-size model holds no copies.
CACHE_MAX_BYTES = 4 * 2**20


def use_cache(*weights: torch.Tensor | None) -> bool:
    """True when grad is off and `weights` are small enough (CACHE_MAX_BYTES together) to keep a derived copy."""
    return not torch.is_grad_enabled() and sum(w.nbytes for w in weights if w is not None) <= CACHE_MAX_BYTES


def derived(owner: nn.Module, name: str, sources: list[torch.Tensor | None],
            build: Callable[[], torch.Tensor | tuple[torch.Tensor, ...]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """`build()` computed from `sources`, cached on `owner` (not in its state_dict) until a source changes.

    A source changes when it is replaced (load, `.to()`: new data_ptr) or updated in place (optimizer step,
    QK-Clip, `copy_`: the version counter moves), so the cache never serves stale weights. Weights created under
    `torch.inference_mode` have no version counter: for them it is rebuilt at every call. Inference only: the result
    does not carry gradients back to the sources.
    """
    try:
        key = [(t.data_ptr(), t._version) for t in sources if t is not None]
    except RuntimeError:  # an inference tensor: no version counter, so nothing can tell when it changes
        return build()
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        owner.__dict__[name] = cached
    return cached[1]


def fused_t(owner: nn.Module, name: str, *linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linears stacked along out-features for inference: W^T [in, sum(out)] contiguous and the bias (zeros where a
    linear has none; None if none has one), cached on `owner` by `derived`."""

    def build() -> tuple[torch.Tensor, torch.Tensor | None]:
        wt = torch.cat([m.weight for m in linears]).t().contiguous()
        if all(m.bias is None for m in linears):
            return wt, None
        return wt, torch.cat([m.weight.new_zeros(m.out_features) if m.bias is None else m.bias for m in linears])

    return derived(owner, name, [t for m in linears for t in (m.weight, m.bias)], build)  # type: ignore[return-value]


def linear_t(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ wt [in, out] (+ bias) -> [..., out]: F.linear on a pre-transposed weight. On CPU, x @ W^T with
    W^T contiguous streams the weight (axpy-like) and is ~2x faster than F.linear's dot per output for few rows."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch.mm(flat, wt) if bias is None else torch.addmm(bias, flat, wt)
    return y.view(*x.shape[:-1], wt.shape[1])


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalized in fp32 and cast back before the weight (as HF DeepseekV3)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 == self.weight.dtype:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one kernel, same math in fp32
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU down(silu(gate(x)) * up(x)): the dense MLP of the first layers, each routed expert, the shared experts.

    With `fuse` (dense and shared MLPs) small-width inference runs gate and up as one matmul over a cached, transposed
    [gate; up] weight; routed experts keep plain F.linear, since a copy of every expert would double the model's memory.
    """

    def __init__(self, dim: int, inter_dim: int, fuse: bool = True) -> None:
        super().__init__()
        self.fuse = fuse
        self.gate_proj = Linear(dim, inter_dim, bias=False)
        self.up_proj = Linear(dim, inter_dim, bias=False)
        self.down_proj = Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse and use_cache(self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight):
            gate_up, _ = fused_t(self, "_gate_up_t", self.gate_proj, self.up_proj)
            down, _ = fused_t(self, "_down_t", self.down_proj)
            gate, up = linear_t(x, gate_up).chunk(2, dim=-1)
            return linear_t(F.silu(gate) * up, down)
        return F.linear(F.silu(F.linear(x, self.gate_proj.weight)) * F.linear(x, self.up_proj.weight),
                        self.down_proj.weight)
