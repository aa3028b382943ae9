"""The two building blocks every K2 layer shares, RMSNorm and the SwiGLU feed-forward, and the token embedding."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.kernels import dequantize_blocks
from ..ops.quantize import MULTIPLE, QuantizedBuffers, quantize_int8
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


def embedding_rows(table: torch.Tensor, scales: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of an embedding table in fp32: an fp32 / fp16 table as stored, int8 blocks times their scales."""
    rows = table[ids]
    return rows.float() if scales is None else dequantize_blocks(rows, scales[ids])


class QuantizedEmbedding(QuantizedBuffers):
    """The embedding table held as int8 blocks + fp16 scales (Q8_0, `kimi_k2.ops.quantize`) or fp16, as llama.cpp
    keeps token_embd in a Q8_0 / F16 file: a lookup dequantizes only the rows it reads -> fp32 [..., D]."""

    weight: torch.Tensor
    scales: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor | None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.fmt = "int8" if weight.dtype == torch.int8 else "fp16"
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, fmt: str) -> QuantizedEmbedding | None:
        """`fmt` rows of the float table [V, D]; None when D is not a multiple of the format's block."""
        if weight.shape[1] % MULTIPLE[fmt]:
            return None
        if fmt == "int8":
            return cls(*quantize_int8(weight))
        return cls(weight.detach().to(torch.float16).contiguous(), None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return embedding_rows(self.weight, self.scales, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, fmt={self.fmt}"


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
