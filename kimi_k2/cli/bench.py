"""`kimi-k2 bench`: engine prefill and decode tokens/s at several batch sizes (random prompts, greedy, no EOS)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from kimi_k2.engine.bench import load_model, measure
from kimi_k2.engine.engine_config import EngineConfig
from kimi_k2.engine.llm_engine import LLMEngine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="k2-small", help="model directory or preset (random weights)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 32], help="concurrent requests")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--new", type=int, default=32, help="generated tokens per request")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--page-size", type=int, default=16)
    # speed: low-precision weights and the compiled single-stream decode (as `kimi-k2 serve`)
    parser.add_argument("--quantization", choices=["int8", "fp16"], default=None,
                        help="projections as int8 or fp16 weights; everything else fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="single-stream decode through one torch.compile'd graph, compiled before timing "
                             "(float32 weights; otherwise eager, logged)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new < 2 or args.prompt < 1 or min(args.batch) < 1:
        raise SystemExit("kimi-k2 bench: need --new >= 2, --prompt >= 1 and batch sizes >= 1")
    model = load_model(args.model, getattr(torch, args.dtype), quantization=args.quantization)
    max_len = args.prompt + args.new
    pages = -(-max_len // args.page_size) * max(args.batch)
    config = EngineConfig(page_size=args.page_size, num_pages=pages, max_model_len=max_len,
                          max_num_seqs=max(args.batch), max_num_batched_tokens=max(2048, args.prompt),
                          enable_prefix_caching=False, compile_decode=args.compile)
    start = time.perf_counter()
    engine = LLMEngine(model, config=config)  # compiles the decode step when it applies
    if engine.runner.decoder is not None:
        print(f"compile_decode: start-up with the compile took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    measure(engine, 1, min(args.prompt, 16), 2)  # warm-up
    precision = args.quantization or args.dtype
    print(f"{args.model} {precision}, prompt {args.prompt}, new {args.new}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} cpus")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'total tok/s':>12} {'seconds':>8}")
    for b in args.batch:
        r = measure(engine, b, args.prompt, args.new)
        print(f"{b:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['total_tok_s']:>12.1f} "
              f"{r['seconds']:>8.2f}")
    return 0
