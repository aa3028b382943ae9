"""PyTorch references for the Triton kernels: the same math in plain fp32 PyTorch, and the argument checks they share.

The references define what the kernels compute (the tests compare against them); `fp8_linear` falls back to
`fp8_linear_reference` where no kernel applies. Shapes follow the kernels:

MLA decode, absorbed form over one layer's latent pages (`kimi_k2.engine.paged_cache`: slot page * page_size + offset
holds a token's [c_kv | k_pe]):
    o_lat[b, h] = sum_t softmax_t(scale * (q_lat[b, h] . c_kv[t] + q_pe[b, h] . k_pe[t])) c_kv[t]
over the tokens t < context_lens[b] of sequence b, with q_lat = W_UK^T q_nope
(`kimi_k2.model.attention.MLA._attend_latent`).

Block-FP8 linear (DeepSeek-V3 / K2 checkpoint layout): y = x @ W^T with W [N, K] e4m3 and an fp32 scale per 128x128
block [ceil(N/128), ceil(K/128)] (W = W_q * scale); with FP8 activations, x is first quantized per 1x128 group:
    s = max(amax(|x_group|), 1e-4) / 448,  x_q = e4m3(x / s)        (DeepSeek-V3 inference/kernel.py `act_quant`)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimi_k2.checkpoint.fp8 import FP8_DTYPE, FP8_MAX, dequantize_block_fp8

GROUP = 128  # activation group along K = weight block edge (K2 quantization_config weight_block_size [128, 128])
ACT_SCALE_EPS = 1e-4  # smallest amax a group's scale is computed from (all-zero groups get a finite scale)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- block-FP8 linear ------------------------------------------------------------------------------------------


def check_fp8_linear_args(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> None:
    """Raise ValueError naming the problem unless x [..., K] float, weight [N, K] e4m3, scale [ceil(N/128), ceil(K/128)]
    fp32, all on one device."""
    if weight.ndim != 2 or weight.dtype != FP8_DTYPE:
        raise ValueError(f"fp8_linear: weight must be a 2-D {FP8_DTYPE} tensor [N, K], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    N, K = weight.shape
    want = (cdiv(N, GROUP), cdiv(K, GROUP))
    if scale.dtype != torch.float32 or tuple(scale.shape) != want:
        raise ValueError(f"fp8_linear: scale must be float32 {want} for weight {tuple(weight.shape)} "
                         f"(one per {GROUP}x{GROUP} block), got {scale.dtype} {tuple(scale.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"fp8_linear: x must be one of {FLOAT_DTYPES}, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != K:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} does not end in K={K} (weight {tuple(weight.shape)})")
    if not x.device == weight.device == scale.device:
        raise ValueError(f"fp8_linear: x, weight and scale must be on one device, got {x.device}, {weight.device}, "
                         f"{scale.device}")


def quantize_act_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (x_q [M, K] e4m3, s [M, ceil(K/128)] fp32) with x ~= x_q * s per 1x128 group."""
    if x.ndim != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_act: x must be a 2-D float tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    M, K = x.shape
    G = cdiv(K, GROUP)
    xg = F.pad(x.float(), (0, G * GROUP - K)).view(M, G, GROUP)
    s = xg.abs().amax(dim=-1).clamp_(min=ACT_SCALE_EPS) / FP8_MAX  # [M, G]
    q = (xg / s[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # round to nearest even
    return q.view(M, G * GROUP)[:, :K].contiguous(), s


def dequantize_act_reference(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(x_q [M, K] e4m3, s [M, ceil(K/128)]) -> x_q * s per group, fp32 [M, K]."""
    K = q.shape[1]
    return (q.float() * s.float().repeat_interleave(GROUP, dim=1)[:, :K])


def fp8_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, quantize_activations: bool
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (weight * scale)^T in fp32, returned as x.dtype.

    quantize_activations: x goes through the 1x128 e4m3 quantization first (the numerics of the FP8 GEMM);
    otherwise x is used as it is (the weight-only path: FP8 storage, bf16/fp16/fp32 math).
    """
    check_fp8_linear_args(x, weight, scale)
    N, K = weight.shape
    x2 = x.reshape(-1, K)
    xf = dequantize_act_reference(*quantize_act_reference(x2)) if quantize_activations else x2.float()
    w = dequantize_block_fp8(weight, scale, (GROUP, GROUP), dtype=torch.float32)
    return (xf @ w.T).to(x.dtype).view(*x.shape[:-1], N)


# ---- paged MLA decode ------------------------------------------------------------------------------------------


def check_mla_decode_args(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, page_size: int,
) -> None:
    """Shapes, dtypes and devices (no device sync): raise ValueError naming the problem."""
    if q_lat.ndim != 3 or q_pe.ndim != 3 or q_lat.shape[:2] != q_pe.shape[:2]:
        raise ValueError(f"mla_decode: q_lat [B, H, R] and q_pe [B, H, rope] must agree on B and H, got "
                         f"{tuple(q_lat.shape)} and {tuple(q_pe.shape)}")
    B, _, R = q_lat.shape
    width = R + q_pe.shape[2]
    if latent.ndim != 2 or latent.shape[1] != width:
        raise ValueError(f"mla_decode: latent pages must be [num_pages * page_size, {R} + {q_pe.shape[2]}], "
                         f"got {tuple(latent.shape)}")
    if page_size < 1 or latent.shape[0] % page_size:
        raise ValueError(f"mla_decode: latent rows {latent.shape[0]} are not a whole number of pages of "
                         f"{page_size}")
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("latent", latent)):
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"mla_decode: {name} must be one of {FLOAT_DTYPES}, got {t.dtype}")
    if q_lat.dtype != q_pe.dtype:
        raise ValueError(f"mla_decode: q_lat and q_pe dtypes differ ({q_lat.dtype}, {q_pe.dtype})")
    if block_tables.ndim != 2 or block_tables.shape[0] != B or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mla_decode: block_tables must be int32/int64 [B={B}, max_pages], got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if context_lens.shape != (B,) or context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"mla_decode: context_lens must be int32/int64 [B={B}], got {context_lens.dtype} "
                         f"{tuple(context_lens.shape)}")
    devices = {t.device for t in (q_lat, q_pe, latent, block_tables, context_lens)}
    if len(devices) != 1:
        raise ValueError(f"mla_decode: all inputs must be on one device, got {sorted(map(str, devices))}")


def check_mla_decode_tables(
    block_tables: torch.Tensor, context_lens: torch.Tensor, page_size: int, num_pages: int
) -> None:
    """Values (reads them on the host): every length in 1..max_pages * page_size, every page a sequence uses in
    0..num_pages-1."""
    capacity = block_tables.shape[1] * page_size
    lens = context_lens.tolist()
    for b, n in enumerate(lens):
        if not 1 <= n <= capacity:
            raise ValueError(f"mla_decode: context_lens[{b}] = {n} is outside 1..{capacity} "
                             f"(block_tables width {block_tables.shape[1]} x page_size {page_size})")
        used = block_tables[b, : cdiv(n, page_size)]
        if bool(((used < 0) | (used >= num_pages)).any()):
            raise ValueError(f"mla_decode: block_tables[{b}] names a page outside 0..{num_pages - 1}: "
                             f"{used.tolist()}")


def mla_decode_reference(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, page_size: int, scale: float,
) -> torch.Tensor:
    """q_lat [B, H, R], q_pe [B, H, rope], latent [num_pages * page_size, R + rope] -> o_lat [B, H, R] as q_lat.dtype,
    computed in fp32 over each sequence's gathered slots."""
    check_mla_decode_args(q_lat, q_pe, latent, block_tables, context_lens, page_size)
    check_mla_decode_tables(block_tables, context_lens, page_size, latent.shape[0] // page_size)
    R = q_lat.shape[2]
    out = torch.empty_like(q_lat)
    for b, n in enumerate(context_lens.tolist()):
        t = torch.arange(n, device=latent.device)
        slots = block_tables[b, t // page_size].long() * page_size + t % page_size
        kv = latent[slots].float()  # [T, R + rope]
        c, k_pe = kv[:, :R], kv[:, R:]
        logits = scale * (q_lat[b].float() @ c.T + q_pe[b].float() @ k_pe.T)  # [H, T]
        out[b] = (logits.softmax(dim=-1) @ c).to(out.dtype)
    return out
