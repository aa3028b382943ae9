"""`kimi-k2 info MODEL`: parameter counts, latent-cache bytes per token and weight bytes of a K2 model or preset,
in closed form from its config (`kimi_k2.model.info`)."""

from __future__ import annotations

import argparse
import json

from kimi_k2.cli.options import add_model, model_config
from kimi_k2.config import PRESETS
from kimi_k2.model.info import COMPONENTS, model_info


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:,.2f}{suffix}{unit}" if suffix else f"{n:,.0f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser, f"model directory (with config.json) or preset: {', '.join(PRESETS)}")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")


def run(args: argparse.Namespace) -> int:
    config = model_config(args.model)
    info = model_info(config)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    print(f"{args.model}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads, {config.n_routed_experts or 0} routed experts "
          f"(top-{config.num_experts_per_tok or 0}), vocab {config.vocab_size}")
    print(f"parameters   total {_human(info.total_params)} ({info.total_params:,})   "
          f"activated {_human(info.activated_params)} ({info.activated_params:,})")
    for name in COMPONENTS:
        n = info.components[name]
        print(f"  {name:<15} {_human(n):>10}  {100 * n / info.total_params:6.2f}%")
    ctx = config.max_position_embeddings
    print(f"KV cache per token (bf16)   MLA latent {info.kv_bytes_per_token:,} B   "
          f"naive per-head {info.naive_kv_bytes_per_token:,} B   ratio {info.kv_ratio:.1f}x")
    print(f"KV cache at {ctx:,} tokens   MLA {_gib(info.kv_bytes_per_token * ctx)}   "
          f"naive {_gib(info.naive_kv_bytes_per_token * ctx)}")
    print(f"weights   bf16 {_gib(info.bf16_bytes)} ({info.bf16_bytes:,} B)   "
          f"block-FP8 {_gib(info.fp8_bytes)} ({info.fp8_bytes:,} B)   "
          f"INT4 experts {_gib(info.int4_bytes)} ({info.int4_bytes:,} B)")
    return 0
