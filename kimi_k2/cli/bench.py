"""`kimi-k2 bench [MODEL]`: engine prefill and decode tokens/s at several batch sizes (random prompts, greedy, no
EOS)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from kimi_k2.cli.options import (
    UsageError,
    add_device,
    add_dtype,
    add_enforce_eager,
    add_model,
    device,
    model_config,
    positive_int,
)
from kimi_k2.config import PRESETS
from kimi_k2.engine.bench import measure
from kimi_k2.engine.engine_config import EngineConfig
from kimi_k2.engine.llm_engine import LLMEngine
from kimi_k2.engine.loader import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser, f"model directory, or a preset with random weights ({', '.join(PRESETS)})", default="k2-small")
    parser.add_argument("--batch-size", type=positive_int, nargs="+", default=[1, 4, 16, 32],
                        help="concurrent requests, one measurement each (default: 1 4 16 32)")
    parser.add_argument("--input-len", type=positive_int, default=128, help="prompt tokens per request (default: 128)")
    parser.add_argument("--output-len", type=positive_int, default=32,
                        help="generated tokens per request, >= 2 (default: 32)")
    add_dtype(parser, "float32")
    parser.add_argument("--seed", type=int, default=0, help="random weights of a preset and the random prompts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--page-size", type=positive_int, default=16)
    parser.add_argument("--json", action="store_true", help="one JSON object per batch size instead of a table")
    add_device(parser)
    add_enforce_eager(parser)
    # speed: low-precision weights and the compiled single-stream decode (as `kimi-k2 serve`)
    parser.add_argument("--quantization", choices=["int8", "fp16"], default=None,
                        help="projections as int8 or fp16 weights; everything else fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="single-stream decode through one torch.compile'd graph, compiled before timing "
                             "(float32 weights; otherwise eager, logged)")


def run(args: argparse.Namespace) -> int:
    if args.output_len < 2:
        raise UsageError("--output-len must be >= 2 (the first token ends the prefill)")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = device(args)
    if args.quantization and where.type != "cpu":
        raise UsageError(f"--quantization {args.quantization} is a CPU format: drop it or pass --device cpu")
    model_config(args.model)  # a missing model: say what to pass
    model = load_model(args.model, getattr(torch, args.dtype), args.seed, quantization=args.quantization,
                       device=where)
    max_len = args.input_len + args.output_len
    batch = max(args.batch_size)
    pages = -(-max_len // args.page_size) * batch
    config = EngineConfig(page_size=args.page_size, num_pages=pages, max_model_len=max_len, max_num_seqs=batch,
                          max_num_batched_tokens=max(2048, args.input_len), enable_prefix_caching=False,
                          compile_decode=args.compile and where.type == "cpu",
                          cuda_graphs=False if args.enforce_eager else None)
    start = time.perf_counter()
    engine = LLMEngine(model, config=config)  # compiles the decode step when it applies
    if engine.runner.decoder is not None:
        print(f"compile_decode: start-up with the compile took {time.perf_counter() - start:.1f} s", file=sys.stderr)
    measure(engine, 1, min(args.input_len, 16), 2, args.seed)  # warm-up
    if engine.runner.decoder is not None and batch > 1:  # its batched graph, else compiled in the background
        engine.runner.decoder.batched_ready()
        engine.runner.decoder.wait_batched()
    precision = args.quantization or args.dtype
    if not args.json:
        print(f"{args.model} {precision} on {where}, input {args.input_len}, output {args.output_len}, torch threads "
              f"{torch.get_num_threads()}, {os.cpu_count()} cpus")
        print(f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'total tok/s':>12} {'seconds':>8}")
    for b in args.batch_size:
        r = measure(engine, b, args.input_len, args.output_len, args.seed)
        if args.json:
            print(json.dumps({"model": args.model, "precision": precision, "device": str(where),
                              "input_len": args.input_len,
                              "output_len": args.output_len, "threads": torch.get_num_threads(), **r}))
        else:
            print(f"{b:>5} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {r['total_tok_s']:>12.1f} "
                  f"{r['seconds']:>8.2f}")
    return 0
