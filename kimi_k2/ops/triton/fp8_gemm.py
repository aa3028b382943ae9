"""Block-FP8 GEMM and 1x128 activation quantization in Triton (math: `reference.fp8_linear_reference`).

`quantize_act`: one program per (row, 128-column group): s = max(amax, 1e-4) / 448, x_q = e4m3(x / s). The rounding to
e4m3 is done in fp32 arithmetic first (`_round_e4m3`, ties to even) so the final cast only stores exact values: the
result is bit-identical to PyTorch's `.to(torch.float8_e4m3fn)` on the GPU and under the interpreter, whose own fp8
cast truncates.

`fp8_gemm`: y = x @ W^T, one program per BLOCK_M x BLOCK_N tile of y, K walked one 128-group at a time, so each step
has one activation scale per row and one weight scale per column:
    FP8_DOT (sm89+):  acc += dot(x_q, W_q^T) * s_x[:, None] * s_w[None, :]           (fp8 tensor cores)
    weight-only:      acc += dot(x, decode(W_q)^T) * s_w[None, :]                   (bf16/fp16/fp32 math)
`decode` turns e4m3 bits into fp16 bits (sign | exponent-mantissa << 7), which is the e4m3 value times 2^-8 for normal
and subnormal inputs alike, exactly; the 2^8 goes into the scale. It only needs integer ops, so it also runs on GPUs
whose Triton has no e4m3 type (sm < 89), keeping the weights in FP8 memory there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_k2.checkpoint.fp8 import FP8_DTYPE, FP8_MAX

from .common import check_device, dot, dot_flags
from .reference import ACT_SCALE_EPS, FLOAT_DTYPES, GROUP, cdiv, check_fp8_linear_args

E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)
E4M3_SUBNORMAL_SHIFTER = tl.constexpr(1.5 * 2.0**14)  # fp32 step here is 2^-9, e4m3's subnormal step: (y+c)-c rounds


@triton.jit
def _round_e4m3(y):
    """fp32 y with |y| <= 448 -> the nearest e4m3 value (ties to even), still fp32."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    mag = bits & 0x7FFFFFFF
    # normal range: keep 3 mantissa bits (of 23), round half to even; a carry rolls into the exponent as it should
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0x7FF00000
    sub = ((tl.abs(y) + E4M3_SUBNORMAL_SHIFTER) - E4M3_SUBNORMAL_SHIFTER).to(tl.uint32, bitcast=True)
    return (tl.where(tl.abs(y) < E4M3_MIN_NORMAL, sub, normal) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _act_quant_kernel(X, Q, S, K, stride_xm, stride_qm, stride_sg, EPS: tl.constexpr, QMAX: tl.constexpr,
                      GROUP: tl.constexpr):
    m = tl.program_id(0)
    g = tl.program_id(1)
    k = g * GROUP + tl.arange(0, GROUP)
    ok = k < K
    x = tl.load(X + m * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
    s = tl.div_rn(tl.maximum(tl.max(tl.abs(x)), EPS), QMAX)
    y = tl.minimum(tl.maximum(tl.div_rn(x, s), -QMAX), QMAX)
    tl.store(Q + m * stride_qm + k, _round_e4m3(y).to(Q.dtype.element_ty), mask=ok)
    tl.store(S + g * stride_sg + m, s)


@triton.jit
def _e4m3_bits_to_f16(bits):
    """uint8 e4m3 bits -> fp16 holding the value times 2^-8 (exact; NaN bits are not special-cased)."""
    b = bits.to(tl.uint16)
    return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def _fp8_gemm_kernel(
    A, A_s, W, W_s, C, M, N, K,
    stride_am, stride_asm, stride_asg, stride_wn, stride_wsn, stride_wsg, stride_cm,
    FP8_DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, GROUP)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(0, tl.cdiv(K, GROUP)):
        k = g * GROUP + rk
        k_ok = k < K
        a = tl.load(A + rm[:, None] * stride_am + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(W + rn[None, :] * stride_wn + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # [G, BN]
        w_s = tl.load(W_s + (rn // GROUP) * stride_wsn + g * stride_wsg, mask=n_ok, other=0.0)  # [BLOCK_N]
        if FP8_DOT:
            a_s = tl.load(A_s + rm * stride_asm + g * stride_asg, mask=m_ok, other=0.0)  # [BLOCK_M]
            part = tl.dot(a, w)
            acc += part * a_s[:, None] * w_s[None, :]
        else:
            part = dot(a, _e4m3_bits_to_f16(w).to(a.dtype), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, IEEE)
            acc += part * (w_s * 256.0)[None, :]
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (x_q [M, K] e4m3, s [M, ceil(K/128)] fp32). s is a column-major view (stride (1, M)),
    the layout `torch.nn.functional.scaled_mm` wants for 1x128 scales."""
    if x.ndim != 2 or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_act: x must be a 2-D float tensor [M, K], got {x.dtype} {tuple(x.shape)}")
    check_device(_act_quant_kernel, "quantize_act", x)
    if x.stride(1) != 1:
        x = x.contiguous()
    M, K = x.shape
    G = cdiv(K, GROUP)
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    s = torch.empty(G, M, dtype=torch.float32, device=x.device)
    if M:
        _act_quant_kernel[(M, G)](x, q, s, K, x.stride(0), q.stride(0), s.stride(0),
                                  EPS=ACT_SCALE_EPS, QMAX=FP8_MAX, GROUP=GROUP, num_warps=1)
    return q, s.t()


def gemm_blocks(m: int) -> dict[str, int]:
    """Tile sizes by rows: decode (small M) is weight-bound, so narrower N tiles give more programs."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    return {"BLOCK_M": block_m, "BLOCK_N": 64 if m <= 64 else 128}


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, fp8_dot: bool) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (weight * scale)^T as x.dtype (fp32 accumulation).

    fp8_dot: quantize x per 1x128 group and multiply in e4m3 (needs sm89+ on the GPU); else the weight-only path.
    """
    check_fp8_linear_args(x, weight, scale)
    check_device(_fp8_gemm_kernel, "fp8_gemm", x, weight, scale)
    N, K = weight.shape
    a = x.reshape(-1, K)
    if a.stride(1) != 1:
        a = a.contiguous()
    M = a.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.view(*x.shape[:-1], N)
    if fp8_dot:
        a, a_s = quantize_act(a)
        w, flags = weight, {"UPCAST": False, "IEEE": False}
    else:
        a_s, w, flags = scale, weight.view(torch.uint8), dot_flags(_fp8_gemm_kernel, x.dtype)  # a_s unused
    cfg = gemm_blocks(M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _fp8_gemm_kernel[grid](
        a, a_s, w, scale, out, M, N, K,
        a.stride(0), a_s.stride(0), a_s.stride(1), w.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
        FP8_DOT=fp8_dot, **flags, **cfg, GROUP=GROUP, num_warps=4, num_stages=3,
    )
    return out.view(*x.shape[:-1], N)
