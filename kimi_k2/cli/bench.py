"""`kimi-k2 bench`: engine prefill and decode tokens/s at several batch sizes (random prompts, greedy, no EOS)."""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--compile", action="store_true",
                        help="single-stream decode through one torch.compile'd graph (float32; compiles first)")


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new < 2 or args.prompt < 1 or min(args.batch) < 1:
        raise SystemExit("kimi-k2 bench: need --new >= 2, --prompt >= 1 and batch sizes >= 1")
    model = load_model(args.model, getattr(torch, args.dtype))
    max_len = args.prompt + args.new
    pages = -(-max_len // args.page_size) * max(args.batch)
    config = EngineConfig(page_size=args.page_size, num_pages=pages, max_model_len=max_len,
                          max_num_seqs=max(args.batch), max_num_batched_tokens=max(2048, args.prompt),
                          enable_prefix_caching=False, compile_decode=args.compile)
    start = time.perf_counter()
    measure(LLMEngine(model, config=config), 1, min(args.prompt, 16), 2)  # warm-up (and the compile)
    if args.compile:
        print(f"compile_decode: warm-up with the compile took {time.perf_counter() - start:.1f} s")
    print(f"{args.model} {args.dtype}, prompt {args.prompt}, new {args.new}, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} cpus")
    print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'total tok/s':>12} {'seconds':>8}")
    for b in args.batch:
        r = measure(LLMEngine(model, config=config), b, args.prompt, args.new)
        print(f"{b:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['total_tok_s']:>12.1f} "
              f"{r['seconds']:>8.2f}")
    return 0
