"""INT4 weight-only quantization in the compressed-tensors `pack-quantized` format (Kimi-K2-Thinking's routed experts).

A Linear weight W [M, N] (out, in) is stored as three tensors (compressed-tensors `PackedQuantizationCompressor`,
`pack_to_int32` / `unpack_from_int32`; llama.cpp `convert_hf_to_gguf.py` `dequant_packed` reads it the same way):
    weight_packed  int32 [M, ceil(N/8)]: the 4-bit values q in [-8, 7], stored as the unsigned nibble q + 8, eight
                   per int32 along the input dim, lowest bits first: element n sits in word n // 8 at bits
                   4 * (n % 8) .. 4 * (n % 8) + 3 (a short last word is padded with zero nibbles)
    weight_scale   [M, ceil(N/g)] (bf16 in K2-Thinking): one scale per group of g = group_size inputs
    weight_shape   int32 [2] = [M, N]
and W[m, n] = q[m, n] * weight_scale[m, n // g] (symmetric: no zero point).

Which weights are quantized follows the quantization_config (kimi_k2.config.int4_quantization_config): its `targets`
("Linear", a module name, or "re:REGEX") minus its `ignore` list, matched against module names (a tensor name without
".weight"). In K2-Thinking that leaves exactly the routed experts: `ignore` holds lm_head, self_attn, shared_experts
and the dense layer's mlp projections.
"""

from __future__ import annotations

import math
import re

import torch

PACK = 8  # 4-bit values per int32
OFFSET = 8  # stored nibble = q + 8
QMAX = 7  # quantizing uses q in [-7, 7] (scale = amax / 7), as the QAT'd K2-Thinking experts do; unpacking takes -8
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")
UNSUPPORTED_SUFFIXES = ("weight_zero_point", "weight_g_idx")  # asymmetric / activation-ordered variants

def _matches(pattern: str, module: str, is_linear: bool) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module or (pattern == "Linear" and is_linear)


def is_int4_target(name: str, q: dict) -> bool:
    """True when the config quantizes weight `name` (a K2 Linear weight: `*_proj.weight` or lm_head.weight)."""
    if not name.endswith(".weight"):
        return False
    module = name.removesuffix(".weight")
    is_linear = module == "lm_head" or module.endswith("_proj") or module.endswith("_proj_with_mqa")
    (group,) = q["config_groups"].values()
    targets = group.get("targets") or []
    return any(_matches(t, module, is_linear) for t in targets) and \
        not any(_matches(p, module, is_linear) for p in q.get("ignore") or [])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q [M, N] integers in [-8, 7] -> int32 [M, ceil(N/8)], nibble i of word j holding q[:, 8j + i] + 8."""
    if q.ndim != 2:
        raise ValueError(f"INT4 packing needs a 2-D tensor, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -OFFSET or int(q.max()) > OFFSET - 1):
        raise ValueError(f"INT4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    M, N = q.shape
    words = math.ceil(N / PACK)
    u = torch.zeros(M, words * PACK, dtype=torch.int64)
    u[:, :N] = q.to(torch.int64) + OFFSET
    u = u.view(M, words, PACK) << (4 * torch.arange(PACK, dtype=torch.int64))
    packed = u.sum(-1)  # disjoint bit fields: the sum is the bitwise or, in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """int32 [M, ceil(N/8)] -> int8 [M, N] in [-8, 7] (the inverse of pack_int4)."""
    M, N = shape
    if packed.dtype != torch.int32 or tuple(packed.shape) != (M, math.ceil(N / PACK)):
        raise ValueError(f"weight_packed must be int32 [{M}, {math.ceil(N / PACK)}] for shape [{M}, {N}], got "
                         f"{packed.dtype} {list(packed.shape)}")
    shifts = 4 * torch.arange(PACK, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift, but the mask keeps the low 4 bits
    return (nibbles.reshape(M, -1)[:, :N] - OFFSET).to(torch.int8)


def scale_shape(shape: tuple[int, int], group_size: int) -> tuple[int, int]:
    return shape[0], math.ceil(shape[1] / group_size)


def quantize_int4(w: torch.Tensor, group_size: int = 32,
                  scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """W [M, N] -> {weight_packed, weight_scale, weight_shape}: per group of `group_size` inputs the scale is
    amax / 7 (rounded to `scale_dtype`) and q = round(W / scale) clamped to [-8, 7]. A dequantized INT4 weight
    (computed in fp32) quantizes back to exactly its q and scale whenever each group holds a +-7."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"INT4 quantization needs a 2-D floating-point weight, got {w.dtype} {tuple(w.shape)}")
    M, N = w.shape
    G = math.ceil(N / group_size)
    x = torch.zeros(M, G * group_size, dtype=torch.float32)
    x[:, :N] = w.float()
    x = x.view(M, G, group_size)
    amax = x.abs().amax(-1)
    if not torch.isfinite(amax).all():
        raise ValueError("INT4 quantization: weight has inf/nan values")
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(x / scale.float().unsqueeze(-1)).clamp_(-OFFSET, OFFSET - 1).view(M, -1)[:, :N]
    shape = torch.tensor([M, N], dtype=torch.int32)
    return {"weight_packed": pack_int4(q), "weight_scale": scale, "weight_shape": shape}


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, int], group_size: int,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """-> W [M, N] = q * scale per group, computed in fp32 (exact), as fp32 or cast into `out`."""
    M, N = shape
    if tuple(scale.shape) != scale_shape(shape, group_size):
        raise ValueError(f"weight_scale has shape {list(scale.shape)}, expected {list(scale_shape(shape, group_size))} "
                         f"for weight [{M}, {N}] with group_size {group_size}")
    q = unpack_int4(packed, shape).float()
    w = q * scale.float().repeat_interleave(group_size, dim=1)[:, :N]
    return w if out is None else out.copy_(w)
