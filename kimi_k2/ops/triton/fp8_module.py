"""`FP8Linear`: a projection whose block-FP8 weight stays FP8 in memory (e4m3 [N, K] + one fp32 scale per 128x128
block, the checkpoint's `weight` / `weight_scale_inv`) and runs through `fp8_linear` (cuBLAS block-scaled FP8 on
Hopper, the Triton FP8 or weight-only kernel on other GPUs, the fp32 reference on the CPU).

`to_fp8_resident` swaps a model's projections for FP8Linear; `load_fp8_weights` fills them from a checkpoint as
stored. The buffers are not part of the state dict (the checkpoint loader dequantizes what it reads): they are
read by `load_fp8_weights` only, and a model with FP8Linear modules is for inference.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_k2.checkpoint import CheckpointReader, Slice
from kimi_k2.checkpoint.fp8 import FP8_DTYPE, quantize_block_fp8

from .fp8_linear import fp8_linear
from .reference import GROUP, cdiv


class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, path: str | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.path = in_features, out_features, path
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                             persistent=False)
        self.register_buffer("weight_scale_inv", torch.empty(cdiv(out_features, GROUP), cdiv(in_features, GROUP),
                                                             dtype=torch.float32, device=device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, path: str | None = None) -> FP8Linear:
        """Quantize a float nn.Linear's weight to block-FP8 (as `kimi-k2 convert --fp8` stores it)."""
        if linear.bias is not None:
            raise ValueError("FP8Linear has no bias: the K2 projections quantized to FP8 have none")
        m = cls(linear.in_features, linear.out_features, path, linear.weight.device)
        w, s = quantize_block_fp8(linear.weight.detach(), (GROUP, GROUP))
        m.weight.copy_(w)
        m.weight_scale_inv.copy_(s)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.path)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 128x128 blocks"


def fp8_candidates(model: nn.Module) -> list[str]:
    """Names of the bias-free nn.Linear modules FP8Linear may replace: every projection except MLA's kv_b_proj (the
    absorbed attention reads its matrix, `kimi_k2.model.functional.absorb`) and lm_head (kept in float, as K2's
    checkpoint does)."""
    return [name for name, m in model.named_modules() if type(m).__name__ == "Linear" and isinstance(m, nn.Linear)
            and m.bias is None and not name.endswith(("kv_b_proj", "lm_head"))]


def to_fp8_resident(model: nn.Module, names: list[str], path: str | None = None) -> None:
    """Replace the named nn.Linear modules by empty FP8Linear modules on the same device (meta stays meta)."""
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old = getattr(owner, attr)
        setattr(owner, attr, FP8Linear(old.in_features, old.out_features, path, old.weight.device))


def block_aligned(part: Slice, full: int) -> bool:
    """Whether a slice of a block-FP8 weight is whole 128-blocks (so it keeps its own scales)."""
    return part.start % GROUP == 0 and (part.stop % GROUP == 0 or part.stop == full)


def load_fp8_weights(model: nn.Module, reader: CheckpointReader, device: torch.device | str,
                     parts: dict[str, Slice] | None = None) -> list[str]:
    """Fill every FP8Linear of `model` (`name.weight` in the checkpoint) with its stored e4m3 weight and scales on
    `device` (only the block-aligned part `parts[name.weight]`, when given: tensor parallelism) -> the weight names
    read."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            w, s = reader.get_fp8(f"{name}.weight")
            part = (parts or {}).get(f"{name}.weight")
            if part is not None:
                if not block_aligned(part, w.shape[part.dim]):
                    raise ValueError(f"{name}: slice {part} of an FP8 weight is not whole {GROUP}-blocks")
                w = w.narrow(part.dim, part.start, part.stop - part.start)
                s = s.narrow(part.dim, part.start // GROUP, cdiv(part.stop, GROUP) - part.start // GROUP)
            if tuple(w.shape) != (m.out_features, m.in_features) or tuple(s.shape) != tuple(m.weight_scale_inv.shape):
                raise ValueError(f"{name}: checkpoint FP8 weight {tuple(w.shape)} / scales {tuple(s.shape)} do not "
                                 f"fit the module [{m.out_features}, {m.in_features}] with 128x128 blocks")
            m.weight, m.weight_scale_inv = w.to(device), s.to(device)
            names.append(f"{name}.weight")
    return names


def quantize_to_fp8_resident(model: nn.Module, path: str | None = None) -> list[str]:
    """Replace every `fp8_candidates` projection of a float model by FP8Linear holding its weight quantized to
    block-FP8 (as `kimi-k2 convert --fp8` would store it), on the same device -> the names replaced."""
    names = fp8_candidates(model)
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, attr, FP8Linear.from_linear(getattr(owner, attr), path))
    return names
