"""Micro-benchmark of the CPU linears `kimi_k2::linear_q8` and `kimi_k2::linear_f16` on k2-medium's decode shapes.

For each shape and row count M: microseconds per call (best of --repeat timings of --calls calls, one thread) and the
weight bytes streamed per second (int8 quants + fp16 scales, or fp16 weights; for routed experts only the experts
read). A fresh copy of the weights per shape larger than the last-level cache keeps the numbers about memory, not L3.

    python benchmarks/bench_q8_kernel.py [--shapes lm_head,mlp_down,...] [--rows 1,2,4,8,32]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from kimi_k2.ops import kernels
from kimi_k2.ops.kernels import pack_q8
from kimi_k2.ops.quantize import quantize_int8

# name: (N, K, experts or 0, rows per call are routed: top-k of `experts`); absorbed attention: (N, K, -heads), each
# of the M rows (sequences) reads every head: ids = arange(heads).repeat_interleave(M), as DecodeStep orders them
SHAPES = {
    "lm_head": (32768, 1024, 0),
    "mlp_gate_up": (5632, 1024, 0),
    "mlp_down": (1024, 2816, 0),
    "q_b": (1536, 512, 0),
    "o_proj": (1024, 1024, 0),
    "experts_gate_up": (256, 1024, 64),
    "experts_down": (1024, 128, 64),
    "kv_b_uk": (512, 128, -8),
    "kv_b_uv": (128, 512, -8),
}
TOP_K = 6


def timed(fn, calls: int, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rows", default="1,2,4,8,32")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    assert kernels.load(), "the C++ kernels did not build"
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':>16} {'M':>3} | {'q8 us':>8} {'q8 GB/s':>8} | {'f16 us':>8} {'f16 GB/s':>8} | q8/f16 time")
    for name in args.shapes.split(","):
        N, K, E = SHAPES[name]
        w = torch.randn(max(abs(E), 1), N, K, generator=g) / K**0.5
        q, d = pack_q8(*quantize_int8(w))
        h = w.half()
        if not E:
            q, d, h = q[0], d[0], h[0]
        for M in (int(m) for m in args.rows.split(",")):
            if E < 0:  # M sequences x every head, rows ordered (head, sequence)
                ids = torch.arange(-E).repeat_interleave(M)
                x = torch.randn(len(ids), K, generator=g)
                read = -E
            elif E:  # M tokens, each routed to TOP_K distinct experts, rows sorted by expert as the MoE layer does
                ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(M)]).flatten().sort().values
                x = torch.randn(len(ids), K, generator=g)
                read = len(ids.unique())
            else:
                ids, read = None, 1
                x = torch.randn(M, K, generator=g)
            q8_bytes = read * N * K * (1 + 2 / 32)
            f16_bytes = read * N * K * 2
            t_q8 = timed(partial(kernels.linear_q8, x, q, d, ids), args.calls, args.repeat)
            t_f16 = timed(partial(kernels.linear_f16, x, h, ids), args.calls, args.repeat)
            print(f"{name:>16} {M:>3} | {t_q8:8.1f} {q8_bytes / t_q8 / 1e3:8.2f} | {t_f16:8.1f} "
                  f"{f16_bytes / t_f16 / 1e3:8.2f} | {t_q8 / t_f16:.2f}")


if __name__ == "__main__":
    main()
