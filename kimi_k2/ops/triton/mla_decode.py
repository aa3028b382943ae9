"""Paged MLA decode in Triton: absorbed attention of one query token per sequence over its latent pages.

Split-K (flash-decoding): stage 1 gives each (sequence, block of BLOCK_H heads, split) program an equal share of the
sequence's token blocks; it reads each latent row [c_kv | k_pe] once, uses c_kv as both key and value, and keeps an
online softmax (running max m, sum l, acc; base-2 exponents with log2(e) folded into the scale). It writes the
normalized partial output and its log-sum-exp. Stage 2 merges a (sequence, head)'s splits:
    o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s   (empty splits have lse = -inf)
The math is `reference.mla_decode_reference`; `mla_decode` checks the arguments and launches both stages.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .common import check_device, dot, dot_flags
from .reference import check_mla_decode_args, check_mla_decode_tables

BLOCK_H = 16  # heads per program: the smallest M of a tensor-core dot; heads past H are masked
MAX_SPLITS = 32
MIN_BLOCKS_PER_SPLIT = 4  # a split below this many token blocks costs more in stage 2 than it saves


@triton.jit
def _split_kernel(
    Q_lat, Q_pe, KV, Tables, Lens, O_part, Lse_part,
    scale_log2, H, num_splits,
    stride_qb, stride_qh, stride_pb, stride_ph, stride_kv, stride_tb,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
    R: tl.constexpr, DR: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_DR)
    h_ok, r_ok, d_ok = heads < H, r < R, d < DR

    q_lat = tl.load(Q_lat + b * stride_qb + heads[:, None] * stride_qh + r[None, :],
                    mask=h_ok[:, None] & r_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_R]
    q_pe = tl.load(Q_pe + b * stride_pb + heads[:, None] * stride_ph + d[None, :],
                   mask=h_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_DR]

    n = tl.load(Lens + b)
    blocks_per_split = tl.cdiv(tl.cdiv(n, BLOCK_N), num_splits)
    start = split * blocks_per_split * BLOCK_N
    end = tl.minimum(start + blocks_per_split * BLOCK_N, n)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        page = tl.load(Tables + b * stride_tb + t // PAGE, mask=t_ok, other=0)
        row = (page.to(tl.int64) * PAGE + t % PAGE) * stride_kv  # [BLOCK_N]
        c = tl.load(KV + row[:, None] + r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        k_pe = tl.load(KV + row[:, None] + R + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        s = dot(q_lat, tl.trans(c), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST, IEEE)
        s = dot(q_pe, tl.trans(k_pe), s, UPCAST, IEEE)
        s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))  # [BLOCK_H, BLOCK_N], log2 units
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = dot(p.to(c.dtype), c, acc * alpha[:, None], UPCAST, IEEE)
        m_i = m_new

    has = l_i > 0  # false only for a split past the sequence's last block
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    tl.store(O_part + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + r[None, :], o,
             mask=h_ok[:, None] & r_ok[None, :])
    tl.store(Lse_part + b * stride_lb + heads * stride_lh + split, lse, mask=h_ok)


@triton.jit
def _merge_kernel(
    O_part, Lse_part, Out, num_splits,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh,
    R: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_R], tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(Lse_part + b * stride_lb + h * stride_lh + s)
        if lse > float("-inf"):
            o = tl.load(O_part + b * stride_ob + h * stride_oh + s * stride_os + r, mask=r_ok, other=0.0)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * o
            l = l * alpha + w
            m = m_new
    out = acc / tl.maximum(l, 1e-30)  # l == 0 only for an empty sequence: zeros, not NaN
    tl.store(Out + b * stride_outb + h * stride_outh + r, out.to(Out.dtype.element_ty), mask=r_ok)


def block_sizes(kv_lora_rank: int, rope_dim: int) -> dict[str, int]:
    """Tile sizes: every dot dimension at least 16 (tensor cores). K2 (512, 64): BLOCK_N 32, so a token block of the
    latent is 32 x 576 bf16 = 36 KiB of shared memory per stage."""
    block_r = max(16, triton.next_power_of_2(kv_lora_rank))
    return {"BLOCK_H": BLOCK_H, "BLOCK_N": 32 if block_r <= 512 else 16, "BLOCK_R": block_r,
            "BLOCK_DR": max(16, triton.next_power_of_2(rope_dim))}


def default_num_splits(batch: int, heads: int, max_tokens: int, device: torch.device, block_n: int) -> int:
    """Enough programs to fill the GPU (2 per SM) while each split keeps MIN_BLOCKS_PER_SPLIT token blocks; from
    shapes only, so no device sync."""
    programs = batch * triton.cdiv(heads, BLOCK_H)
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    by_work = max(1, triton.cdiv(max_tokens, block_n * MIN_BLOCKS_PER_SPLIT))
    return max(1, min(MAX_SPLITS, by_work, target // programs))


def mla_decode(
    q_lat: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, page_size: int, scale: float, num_splits: int | None = None, check: bool = True,
) -> torch.Tensor:
    """q_lat [B, H, R] (W_UK^T q_nope), q_pe [B, H, rope], latent [num_pages * page_size, R + rope] (one layer's pool),
    block_tables [B, max_pages], context_lens [B] -> o_lat [B, H, R] as q_lat.dtype. Products in latent.dtype (the
    queries are cast to it), accumulation in fp32.

    check: also verify the lengths and page ids (reads them on the host: a device sync; pass False where the caller
    guarantees them, e.g. inside a CUDA graph). num_splits: splits of each sequence's tokens (default from shapes).
    """
    check_mla_decode_args(q_lat, q_pe, latent, block_tables, context_lens, page_size)
    check_device(_split_kernel, "mla_decode", q_lat, q_pe, latent, block_tables, context_lens)
    if check:
        check_mla_decode_tables(block_tables, context_lens, page_size, latent.shape[0] // page_size)
    if latent.stride(1) != 1:
        raise ValueError(f"mla_decode: latent rows must be contiguous, got strides {latent.stride()}")
    out = torch.empty_like(q_lat)
    q_lat, q_pe = q_lat.to(latent.dtype).contiguous(), q_pe.to(latent.dtype).contiguous()  # dot operands: one dtype
    B, H, R = q_lat.shape
    DR = q_pe.shape[2]
    if B == 0 or H == 0:
        return out
    cfg = block_sizes(R, DR)
    if num_splits is None:
        num_splits = default_num_splits(B, H, block_tables.shape[1] * page_size, q_lat.device, cfg["BLOCK_N"])
    if num_splits < 1:
        raise ValueError(f"mla_decode: num_splits must be >= 1, got {num_splits}")
    o_part = torch.empty(B, H, num_splits, R, dtype=torch.float32, device=q_lat.device)
    lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_lat.device)
    _split_kernel[(B, triton.cdiv(H, BLOCK_H), num_splits)](
        q_lat, q_pe, latent, block_tables, context_lens, o_part, lse,
        scale * math.log2(math.e), H, num_splits,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), latent.stride(0), block_tables.stride(0),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        R=R, DR=DR, PAGE=page_size, **cfg, **dot_flags(_split_kernel, latent.dtype), num_warps=4, num_stages=2,
    )
    _merge_kernel[(B, H)](
        o_part, lse, out, num_splits,
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), R=R, BLOCK_R=cfg["BLOCK_R"], num_warps=4,
    )
    return out
