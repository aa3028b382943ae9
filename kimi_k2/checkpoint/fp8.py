"""Block-FP8 weights, DeepSeek-V3 convention (`inference/kernel.py` `weight_dequant`).

A weight W [M, N] is stored as e4m3fn W_q [M, N] plus an fp32 `weight_scale_inv` S [ceil(M/bm), ceil(N/bn)]:
    W[i*bm:(i+1)*bm, j*bn:(j+1)*bn] = W_q[...].float() * S[i, j]    (edge blocks masked; S is MULTIPLIED in)
Quantization picks S[i, j] = amax(|block|) / 448, so every block uses the full e4m3 range.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
SCALE_SUFFIX = "_scale_inv"

# every attention/MLP/expert projection: q_proj, q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj,
# gate_proj, up_proj, down_proj. Not: embed_tokens, lm_head, norms, the router `mlp.gate.weight` (§1.5).
_QUANTIZED = re.compile(r"_proj(_with_mqa)?\.weight$")


def is_quantized_name(name: str) -> bool:
    """True for the tensors the published K2 checkpoint stores as block-FP8."""
    return _QUANTIZED.search(name) is not None


def scale_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int]) -> tuple[int, int]:
    m, n = shape
    return math.ceil(m / block[0]), math.ceil(n / block[1])


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[M, N] float -> [m, bm, n, bn], zero-padded to whole blocks."""
    (bm, bn), (m, n) = block, scale_shape(x.shape, block)
    if (m * bm, n * bn) != tuple(x.shape):
        x = F.pad(x, (0, n * bn - x.shape[1], 0, m * bm - x.shape[0]))
    return x.view(m, bm, n, bn)


def quantize_block_fp8(
    w: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [M, N] -> (W_q [M, N] e4m3fn, S [ceil(M/bm), ceil(N/bn)] fp32) with W ~= W_q * S per block."""
    if w.ndim != 2:
        raise ValueError(f"block-FP8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"block-FP8 quantization needs a floating-point weight, got {w.dtype}")
    M, N = w.shape
    x = _blocks(w.float(), block)  # [m, bm, n, bn]
    amax = x.abs().amax(dim=(1, 3))  # [m, n]
    if not torch.isfinite(amax).all():
        raise ValueError("block-FP8 quantization: weight has inf/nan values")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # all-zero block: any scale works
    q = (x / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(x.shape[0] * x.shape[1], -1)[:M, :N].contiguous(), scale


def dequantize_block_fp8(
    w: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W_q [M, N] (e4m3fn), S [ceil(M/bm), ceil(N/bn)] -> W_q * S expanded per block, as `dtype` (or into `out`)."""
    if w.ndim != 2:
        raise ValueError(f"block-FP8 weight must be 2-D, got shape {tuple(w.shape)}")
    want = scale_shape(w.shape, block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
            f"with block {tuple(block)}: expected {want}"
        )
    M, N = w.shape
    x = _blocks(w.float(), block).mul_(scale_inv.float()[:, None, :, None])  # [m, bm, n, bn]
    x = x.view(x.shape[0] * x.shape[1], -1)[:M, :N]
    if out is None:
        return x.to(dtype).contiguous()
    if out.shape != w.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, weight has {tuple(w.shape)}")
    return out.copy_(x)
