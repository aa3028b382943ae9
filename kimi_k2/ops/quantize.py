"""Low-precision linears for CPU inference on PyTorch's FBGEMM kernels (the `quantized::` ops; x86 AVX2/AVX-512).

    int8:  W8A8 dynamic (`quantized::linear_dynamic`). W is quantized once, symmetric per output channel:
           W_q = round(W / s), s = amax|W_row| / 64, so |W_q| <= 64: AVX2's vpmaddubsw sums two u8 * s8 products in
           int16, and 2 * 255 * 64 < 2^15 never saturates with full 8-bit activations (the alternative, 7-bit
           activations, measured worse on the nano model). Each call quantizes x per row (token): rows are divided by
           their amax|x|, FBGEMM quantizes the batch over the fixed range [-1, 1] (a pinning row holds -1 and 1),
           multiplies in int8 with int32 accumulation, and the rows are scaled back. Per-row scales make a token's
           result independent of the batch it is in.
    fp16:  W stored as fp16, x and the accumulation stay fp32 (`quantized::linear_dynamic_fp16`).

Why these kernels (measured on the 2-core AVX2 box, 1 thread, [1, 1024] x [1024, 4096]): FBGEMM int8 ran ~3.5x
faster than the fp32 BLAS matvec, at ~1.1% relative error per product; `aten._weight_int8pack_mm` (weight-only int8,
as gpt-fast and torchao's CPU path use) and bf16/fp16 `F.linear` were 2-5x *slower* than fp32 here (no AVX-512/AMX),
and torch.compile's fused dequantize-reduction ran several times slower than the BLAS. Caveat: PyTorch has deprecated
creating qint8 tensors (pytorch#184982), which FBGEMM's packing still takes; when it goes, the packing moves to
torchao or a kernel of our own.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

FORMATS = ("int8", "fp16")
WEIGHT_QMAX = 64  # |W_q| bound that keeps AVX2's int16 pair sums from saturating (see above)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (W_q [N, K] int8 in [-64, 64], s [N] fp32) with W ~= W_q * s[:, None] (per output channel)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / WEIGHT_QMAX
    return (w / scale[:, None]).round_().clamp_(-WEIGHT_QMAX, WEIGHT_QMAX).to(torch.int8), scale


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held in an FBGEMM packed int8 or fp16 layout; x and y are fp32 (any leading dims).

    The packed weight is not a tensor of this module's state_dict: a quantized model is built from a float checkpoint
    (`from_float`), never saved.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, packed: torch.ScriptObject,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; choose one of {FORMATS}")
        self.in_features, self.out_features, self.fmt, self.packed = in_features, out_features, fmt, packed
        self.bias = bias  # int8: added after the per-row rescale (fp16: packed with the weight)
        self.pin = torch.zeros(1, in_features)  # int8: the row that fixes the activation range to [-1, 1]
        self.pin[0, 0], self.pin[0, -1] = -1.0, 1.0

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> QuantizedLinear:
        if weight.ndim != 2 or not weight.is_floating_point():
            raise ValueError(f"a linear weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
        b = None if bias is None else bias.detach().float().contiguous()
        if fmt == "int8":
            q, scale = quantize_int8(weight)
            with warnings.catch_warnings():  # FBGEMM's packing still takes a qint8 tensor, whose creation warns
                warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
                qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale,
                                                                                                  dtype=torch.long), 0)
            return cls(weight.shape[1], weight.shape[0], fmt, torch.ops.quantized.linear_prepack(qw, None), b)
        if fmt == "fp16":
            packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), b)
            return cls(weight.shape[1], weight.shape[0], fmt, packed)
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {FORMATS}")

    @property
    def weight_bytes(self) -> int:
        return self.in_features * self.out_features * (1 if self.fmt == "int8" else 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if self.fmt == "int8":
            amax = flat.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30)  # [M, 1]
            y = torch.ops.quantized.linear_dynamic(torch.cat([flat / amax, self.pin]), self.packed, False)[:-1] * amax
            if self.bias is not None:
                y += self.bias
        else:
            y = torch.ops.quantized.linear_dynamic_fp16(flat, self.packed)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantize_linears(model: nn.Module, fmt: str, keep: Callable[[str], bool] = lambda name: False,
                     source: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> list[str]:
    """Replace every nn.Linear of `model` whose name `keep` rejects by a QuantizedLinear -> the names replaced.

    source(name) gives the float (weight, bias) to quantize (default: the linear's own), so a meta-device model can
    be quantized from a checkpoint one tensor at a time; each original is dropped as soon as it is replaced.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {FORMATS}")
    done = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, nn.Linear) and not keep(name):
                weight, bias = (child.weight, child.bias) if source is None else source(name)
                setattr(parent, child_name, QuantizedLinear.from_float(weight, bias, fmt))
                done.append(name)
    return done
