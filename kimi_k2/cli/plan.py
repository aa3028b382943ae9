"""`kimi-k2 plan`: which GPU layouts hold a K2-family model, and how many sequences of a given context fit."""

from __future__ import annotations

import argparse

from kimi_k2.config import PRESETS, K2Config
from kimi_k2.deploy.plan import GPUS, make_plan, render, smallest_unit


def _parse_gpus(spec: str) -> tuple[int, str]:
    count, sep, kind = spec.partition("x")
    if not sep or not count.isdigit():
        raise ValueError(f"--gpus must look like 16xH200, got {spec!r}")
    for known in GPUS:
        if known.lower() == kind.lower():
            return int(count), known
    raise ValueError(f"unknown GPU {kind!r}; known: {', '.join(sorted(GPUS))}")



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="kimi-k2-instruct", help=f"preset ({', '.join(PRESETS)}) or model directory")
    p.add_argument("--gpus", default="16xH200", help="COUNTxKIND, e.g. 16xH200")
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="plan for bf16 weights instead of block-FP8")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--reserve-gib", type=float, default=2.0, help="per GPU for activations and runtime")
    p.add_argument("--smallest", action="store_true", help="search the fewest GPUs of that kind that fit")


def run(args: argparse.Namespace) -> int:
    cfg = K2Config.from_pretrained(args.model)
    n, gpu = _parse_gpus(args.gpus)
    kw = dict(fp8=not args.bf16, gpu_memory_utilization=args.gpu_memory_utilization, reserve_gib=args.reserve_gib,
              model_name=args.model)
    if args.smallest:
        plan = smallest_unit(cfg, gpu, args.context, args.concurrency, **kw)
        if plan is None:
            print(f"no layout of up to 256 x {gpu} fits")
            return 1
        print(f"smallest unit: {plan.n_gpus} x {gpu}\n")
    else:
        plan = make_plan(cfg, gpu, n, args.context, args.concurrency, **kw)
    print(render(plan, cfg))
    return 0 if plan.fits else 1
