"""`kimi-k2 plan [MODEL]`: which GPU layouts hold a K2-family model, and how many sequences of a given context fit.
`kimi-k2 plan --train [MODEL]`: the memory per GPU of training it with FSDP2 + expert parallelism and MuonClip.

Exit status 1 when no layout fits (the plan is printed either way).
"""

from __future__ import annotations

import argparse

from kimi_k2.cli.options import add_model, model_config, positive_int
from kimi_k2.config import PRESETS
from kimi_k2.deploy.plan import GPUS, make_plan, render, smallest_unit
from kimi_k2.deploy.train_plan import make_train_plan, render_train, smallest_train_unit


def gpus(spec: str) -> tuple[int, str]:
    """'16xH200' -> (16, 'H200') (argparse type)."""
    count, sep, kind = spec.partition("x")
    if not sep or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected COUNTxKIND such as 16xH200, got {spec!r}")
    for known in GPUS:
        if known.lower() == kind.lower():
            return int(count), known
    raise argparse.ArgumentTypeError(f"unknown GPU {kind!r}; known: {', '.join(sorted(GPUS))}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, f"model directory (with config.json) or preset: {', '.join(PRESETS)}", default="kimi-k2-instruct")
    p.add_argument("--gpus", type=gpus, default="16xH200", metavar="COUNTxKIND",
                   help=f"GPUs to plan for, e.g. 16xH200 (default); kinds: {', '.join(GPUS)}")
    p.add_argument("--context", type=positive_int, default=131072, help="tokens per sequence (default: 131072)")
    p.add_argument("--concurrency", type=positive_int, default=1, help="sequences that must fit at once")
    p.add_argument("--weights", default="fp8", choices=["fp8", "bf16"],
                   help="block-FP8 weights as published (default), or bf16")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--reserve-gib", type=float, help="per GPU for activations and runtime (default: 2, 8 with "
                                                      "--train)")
    p.add_argument("--smallest", action="store_true", help="search the fewest GPUs of that kind that fit")
    p.add_argument("--train", action="store_true",
                   help="plan training instead (FSDP2 + expert parallel, fp32 masters, MuonClip state)")
    p.add_argument("--param-dtype", default="bf16", choices=["bf16", "fp32"],
                   help="--train: dtype of the gathered parameters forward and backward run in (default: bf16)")


def run_train(args: argparse.Namespace) -> int:
    cfg = model_config(args.model)
    n, gpu = args.gpus
    kw = dict(param_bytes=2 if args.param_dtype == "bf16" else 4, gpu_memory_utilization=args.gpu_memory_utilization,
              reserve_gib=8.0 if args.reserve_gib is None else args.reserve_gib, model_name=args.model)
    if args.smallest:
        plan = smallest_train_unit(cfg, gpu, **kw)
        if plan is None:
            print(f"no layout of up to 4096 x {gpu} holds the training state")
            return 1
        print(f"smallest unit: {plan.n_gpus} x {gpu}\n")
    else:
        plan = make_train_plan(cfg, gpu, n, **kw)
    print(render_train(plan))
    return 0 if plan.fits else 1


def run(args: argparse.Namespace) -> int:
    if args.train:
        return run_train(args)
    cfg = model_config(args.model)
    n, gpu = args.gpus
    kw = dict(fp8=args.weights == "fp8", gpu_memory_utilization=args.gpu_memory_utilization,
              reserve_gib=2.0 if args.reserve_gib is None else args.reserve_gib, model_name=args.model)
    if args.smallest:
        plan = smallest_unit(cfg, gpu, args.context, args.concurrency, **kw)
        if plan is None:
            print(f"no layout of up to 256 x {gpu} fits")
            return 1
        print(f"smallest unit: {plan.n_gpus} x {gpu}\n")
    else:
        plan = make_plan(cfg, gpu, n, args.context, args.concurrency, **kw)
    print(render(plan, cfg, args.gpu_memory_utilization))
    return 0 if plan.fits else 1
