"""Low-precision linear weights for CPU inference, on the kernels of `kimi_k2.ops.kernels`.

    int8:  llama.cpp's Q8_0: each row of W in blocks of 32 weights with one fp16 scale, d = amax / 127,
           W_q = round(W / d) in [-127, 127] (8.5 bits per weight); activations are quantized the same way at each
           call (int8 blocks with an fp32 scale), so every block's dot product is an exact int32 sum.
    fp16:  W stored as IEEE half; activations and accumulation stay fp32.

A QuantizedLinear keeps its weight ([N, K] int8 or fp16) and int8 scales ([N, K/32] fp16) as non-persistent buffers,
int8 in the kernel's packed row order (`kimi_k2.ops.kernels.pack_q8`, made once here; `dequantized` undoes it):
a quantized model is made from a float checkpoint (`kimi_k2.model.quantized`), never saved. Engine layouts
(`kimi_k2.ops.layout`) make these buffers views of fused or stacked tensors, as they do with float weights.
`linear` is the one entry point for a weight in any of the formats (fp32 / fp16 / int8, optionally stacked experts
read by id), used by the modules and by the compiled decode alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import QK, RG, dequantize_blocks, pack_q8, unpack_q8

FORMATS = ("int8", "fp16")
MULTIPLE = {"int8": QK, "fp16": 8}  # in_features must be a multiple of this
ROWS_MULTIPLE = {"int8": RG, "fp16": 1}  # and out_features of this
QUANTIZE_CHUNK = 1 << 20  # weights per step of quantize_int8

log = logging.getLogger(__name__)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., K] float -> (W_q int8 [..., K], d fp16 [..., K/32]) with W ~= W_q * d per block of 32 (Q8_0).

    d is rounded to fp16 first and W_q computed with the rounded scale, so |W - W_q d| <= d / 2 for every weight.
    Rows are quantized QUANTIZE_CHUNK weights at a time: the fp32 temporaries are a few MiB, not copies of W (a 128 MiB
    lm_head made ~500 MiB of them at load).
    """
    w = weight.detach().reshape(-1, weight.shape[-1])
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    d = torch.empty(w.shape[0], w.shape[1] // QK, dtype=torch.float16, device=w.device)
    step = max(1, QUANTIZE_CHUNK // max(1, w.shape[1]))
    for i in range(0, w.shape[0], step):
        blocks = w[i : i + step].float().unflatten(-1, (-1, QK))
        d[i : i + step] = (blocks.abs().amax(-1) / 127).half()
        df = d[i : i + step].float()[..., None]
        q[i : i + step] = torch.where(df > 0, blocks / df, torch.zeros_like(blocks)).round_().clamp_(-127, 127)\
            .flatten(-2)
    return q.view(weight.shape), d.view(*weight.shape[:-1], weight.shape[-1] // QK)


def linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None = None,
           ids: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T for x [M, K] and W [N, K] stored as fp32, fp16 or int8 (+ scales) -> fp32 [M, N].

    ids [M]: W is a stack [E, N, K] and row i uses W[ids[i]] (x has M rows, or one row all of them read).
    """
    if weight.dtype == torch.int8:
        return kernels.linear_q8(x, weight, scales, ids)
    if weight.dtype == torch.float16:
        return kernels.linear_f16(x, weight, ids)
    if ids is None:
        return F.linear(x, weight.float())
    return kernels.linear_f32(x, weight.float(), ids)


def float_weight(m: nn.Module) -> torch.Tensor:
    """The fp32 (or model-dtype) weight [N, K] of an nn.Linear, or a QuantizedLinear's weight dequantized."""
    if isinstance(m, QuantizedLinear):
        return m.dequantized()
    return m.weight


class QuantizedBuffers(nn.Module):
    """A module whose weights are quantized buffers: device moves apply; dtype casts (`model.float()`, `.half()`)
    leave the stored format alone."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantizedBuffers:
        for name, t in self._buffers.items():
            if t is not None:
                device = fn(torch.empty(0, dtype=t.dtype, device=t.device)).device
                if device != t.device:
                    self._buffers[name] = t.to(device)
        return self


class QuantizedLinear(QuantizedBuffers):
    """y = x W^T + b with W held as int8 blocks (+ fp16 scales) or fp16; x and y are fp32 (any leading dims)."""

    weight: torch.Tensor
    scales: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor | None, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.fmt = "int8" if weight.dtype == torch.int8 else "fp16"
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> QuantizedLinear:
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; choose one of {FORMATS}")
        if weight.ndim != 2 or not weight.is_floating_point():
            raise ValueError(f"a linear weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
        if weight.shape[1] % MULTIPLE[fmt] or weight.shape[0] % ROWS_MULTIPLE[fmt]:
            raise ValueError(f"{fmt} weights need in_features divisible by {MULTIPLE[fmt]} and out_features by "
                             f"{ROWS_MULTIPLE[fmt]}, got {weight.shape[1]} and {weight.shape[0]}")
        b = None if bias is None else bias.detach().float().contiguous()
        if fmt == "int8":
            return cls(*pack_q8(*quantize_int8(weight)), b)
        return cls(weight.detach().to(torch.float16).contiguous(), None, b)

    @property
    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + (
            0 if self.scales is None else self.scales.numel() * self.scales.element_size())

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() if self.scales is None else dequantize_blocks(*unpack_q8(self.weight, self.scales))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x.reshape(-1, self.in_features).float(), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantize_linears(model: nn.Module, fmt: str, keep: Callable[[str], bool] = lambda name: False,
                     source: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> list[str]:
    """Replace every nn.Linear of `model` whose name `keep` rejects by a QuantizedLinear -> the names replaced.

    source(name) gives the float (weight, bias) to quantize (default: the linear's own), so a meta-device model can
    be quantized from a checkpoint one tensor at a time; each original is dropped as soon as it is replaced. A linear
    whose shape the format cannot take (in_features: int8 multiples of 32, fp16 of 8; int8 out_features: multiples of
    8) stays float, with a warning.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {FORMATS}")
    done, kept = [], []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear) or keep(name):
                continue
            if child.in_features % MULTIPLE[fmt] or child.out_features % ROWS_MULTIPLE[fmt]:
                kept.append(name)
                continue
            weight, bias = (child.weight, child.bias) if source is None else source(name)
            setattr(parent, child_name, QuantizedLinear.from_float(weight, bias, fmt))
            done.append(name)
    if kept:
        log.warning("%d linears stay float: %s needs in_features divisible by %d and out_features by %d (%s)",
                    len(kept), fmt, MULTIPLE[fmt], ROWS_MULTIPLE[fmt], ", ".join(kept[:5]))
    return done
