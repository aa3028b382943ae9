"""`kimi-k2 COMMAND ...`: one entry point, one module per command in this package.

A command module provides `add_arguments(parser)` and `run(args) -> int`. Only the chosen command's module is
imported, so `kimi-k2 info` does not pay for the server's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("kimi_k2.cli.eval", "avg@k and tool-call accuracy of an OpenAI-compatible endpoint on held-out tasks"),
    "data": ("kimi_k2.cli.data", "synthetic chat/tool-use data, pretraining corpus, held-out benchmarks"),
    "chat": ("kimi_k2.cli.chat", "interactive terminal chat with a server URL or a model directory"),
    "serve": ("kimi_k2.cli.serve", "OpenAI- and Anthropic-compatible HTTP server for a model directory"),
    "info": ("kimi_k2.cli.info", "parameter counts, KV-cache and weight bytes of a model or preset"),
    "plan": ("kimi_k2.cli.plan", "GPU layouts (TP / PP / DP+EP) and concurrency that fit a model, from its config"),
    "convert": ("kimi_k2.cli.convert", "convert a checkpoint between block-FP8 and bf16"),
    "tokenizer": ("kimi_k2.cli.tokenizer", "train a Kimi-format BPE tokenizer; encode/decode text with one"),
    "train": ("kimi_k2.cli.train", "pretrain or fine-tune from a recipe TOML (resumes; torchrun for data parallel)"),
    "generate-ep": ("kimi_k2.cli.generate_ep", "greedy generation, experts sharded over torchrun ranks (gloo/NCCL)"),
    "generate": ("kimi_k2.cli.generate", "complete prompts or chats with the inference engine (batched, sampled)"),
    "bench": ("kimi_k2.cli.bench", "engine prefill/decode tokens/s at several batch sizes"),
    "plot": ("kimi_k2.cli.plot", "PNG curves (loss, lr, grad norm, max logits, expert load) of training runs"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = argparse.ArgumentParser(prog="kimi-k2", description="Kimi K2 in PyTorch")
    top.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        top.parse_args(argv)  # prints help or a clear "invalid choice" error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"kimi-k2 {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except (ValueError, OSError) as e:  # bad input (a flag's value, a file): say what, not a traceback
        print(f"kimi-k2 {name}: error: {e}", file=sys.stderr)
        return 1

