"""Kernel micro-benchmarks: paged MLA decode (Triton vs the PyTorch reference vs torch SDPA over contiguous latents) and
the block-FP8 GEMM (each `fp8_linear` path vs a bf16 matmul of the dequantized weight), with the error of each against
the reference. Kernels are imported by the caller's choice of TRITON_INTERPRET (see driver.py)."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kimi_k2.checkpoint.fp8 import dequantize_block_fp8, quantize_block_fp8
from kimi_k2.ops.triton.reference import fp8_linear_reference, mla_decode_reference


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median seconds per call (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def mla_decode_rows(device: torch.device, cases: list[tuple[int, int, int]], kv_lora_rank: int, rope: int, page: int,
                    warmup: int, reps: int, dtype: torch.dtype = torch.bfloat16) -> list[dict[str, object]]:
    """cases: (batch, heads, context). Every sequence has the full context; pages are shuffled."""
    from kimi_k2.ops.triton.mla_decode import mla_decode

    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for B, H, T in cases:
        width = -(-T // page)
        num_pages = B * width
        latent = torch.randn(num_pages * page, kv_lora_rank + rope, generator=g).to(device, dtype)
        tables = torch.randperm(num_pages, generator=g).view(B, width).to(device, torch.int32)
        lens = torch.full((B,), T, dtype=torch.int32, device=device)
        q_lat = (torch.randn(B, H, kv_lora_rank, generator=g) * 0.05).to(device, dtype)
        q_pe = torch.randn(B, H, rope, generator=g).to(device, dtype)
        scale = 192**-0.5
        ref = mla_decode_reference(q_lat, q_pe, latent, tables, lens, page, scale)
        # SDPA over the same tokens gathered into contiguous [B, T, R + rope] latents (gather not timed)
        t = torch.arange(T, device=device)
        kv = latent[(tables[:, t // page].long() * page + t % page)]  # [B, T, R + rope]
        q = torch.cat([q_lat, q_pe], -1)[:, :, None]  # [B, H, 1, R + rope]
        k, v = kv[:, None].expand(B, H, T, -1), kv[:, None, :, :kv_lora_rank].expand(B, H, T, -1)
        args = (q_lat, q_pe, latent, tables, lens, page, scale)
        calls = {
            "triton": functools.partial(mla_decode, *args, check=False),
            "reference": functools.partial(mla_decode_reference, *args),
            "sdpa_contiguous": functools.partial(F.scaled_dot_product_attention, q, k, v, scale=scale),
        }
        latent_bytes = B * T * (kv_lora_rank + rope) * latent.element_size()
        for name, fn in calls.items():
            s = time_call(fn, device, warmup, reps)
            rows.append({"kernel": "mla_decode", "impl": name, "batch": B, "heads": H, "context": T, "page": page,
                         "ms": s * 1e3, "latent_GB_s": latent_bytes / s / 1e9,
                         "max_err": _max_err(fn().view(ref.shape), ref)})
    return rows


def fp8_gemm_rows(device: torch.device, shapes: list[tuple[int, int]], ms: list[int], warmup: int, reps: int,
                  dtype: torch.dtype = torch.bfloat16) -> list[dict[str, object]]:
    """shapes: weight (N, K); ms: rows of x. Bandwidth counts the weight bytes each call reads; max_err is against
    the FP8-activation reference, so the paths without activation quantization show its effect."""
    from kimi_k2.ops.triton.fp8_gemm import fp8_gemm
    from kimi_k2.ops.triton.fp8_linear import fp8_linear_scaled_mm, scaled_mm_supported

    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for N, K in shapes:
        w, s = quantize_block_fp8(torch.randn(N, K, generator=g) * K**-0.5)
        w, s = w.to(device), s.to(device)
        w_bf16 = dequantize_block_fp8(w, s, dtype=dtype)
        for M in ms:
            x = torch.randn(M, K, generator=g).to(device, dtype)
            ref = fp8_linear_reference(x, w, s, quantize_activations=True)
            fp8_bytes, matmul = N * K, f"{str(dtype).removeprefix('torch.')}_matmul"
            calls = {
                "triton_fp8": (functools.partial(fp8_gemm, x, w, s, fp8_dot=True), fp8_bytes),
                "triton_w8a16": (functools.partial(fp8_gemm, x, w, s, fp8_dot=False), fp8_bytes),
                matmul: (functools.partial(F.linear, x, w_bf16), N * K * w_bf16.element_size()),
                "reference": (functools.partial(fp8_linear_reference, x, w, s, quantize_activations=True), fp8_bytes),
            }
            if scaled_mm_supported(device, N, K):
                calls["scaled_mm"] = (functools.partial(fp8_linear_scaled_mm, x, w, s), fp8_bytes)
            if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
                del calls["triton_fp8"]  # no e4m3 tensor cores
            for name, (fn, weight_bytes) in calls.items():
                sec = time_call(fn, device, warmup, reps)
                rows.append({"kernel": "fp8_gemm", "impl": name, "M": M, "N": N, "K": K, "ms": sec * 1e3,
                             "weight_GB_s": weight_bytes / sec / 1e9, "max_err": _max_err(fn(), ref)})
    return rows
