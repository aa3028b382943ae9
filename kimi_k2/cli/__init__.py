"""`kimi-k2 COMMAND ...`: one entry point, one module per command in this package.

A command module provides `add_arguments(parser)` and `run(args) -> int`. Only the chosen command's module is
imported, so `kimi-k2 info` does not pay for the server's imports. Conventions (`options.py`): the model is the
first positional (`kimi-k2 serve MODEL`, as `vllm serve MODEL`; `--model MODEL` is accepted too); usage errors exit
with status 2, runtime errors with 1 after `kimi-k2 CMD: error: MESSAGE`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kimi_k2.cli.options import CommandError, UsageError, resolve_model

# command -> (module, what it does: the --help description, and the README's account of the command)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("kimi_k2.cli.info", "parameter counts, latent-cache and weight bytes of a model or preset"),
    "plan": ("kimi_k2.cli.plan", "GPU layouts (TP / TP x PP / DP+EP) and concurrency that fit a model"),
    "convert": ("kimi_k2.cli.convert", "convert a checkpoint between block-FP8 and bf16, one tensor at a time"),
    "tokenizer": ("kimi_k2.cli.tokenizer", "train a Kimi-format BPE tokenizer; encode/decode text with one"),
    "generate": ("kimi_k2.cli.generate", "complete prompts or chats with the inference engine (batched, sampled; "
                                         "experts over torchrun ranks with --ep)"),
    "bench": ("kimi_k2.cli.bench", "engine prefill/decode tokens/s at several batch sizes"),
    "serve": ("kimi_k2.cli.serve", "OpenAI- and Anthropic-compatible HTTP server for a model directory"),
    "chat": ("kimi_k2.cli.chat", "interactive terminal chat with a server URL or a model directory"),
    "train": ("kimi_k2.cli.train", "pretrain or fine-tune from a recipe TOML (resumes; torchrun for data parallel)"),
    "plot": ("kimi_k2.cli.plot", "PNG curves (loss, lr, grad norm, max logits, expert load) of training runs"),
    "data": ("kimi_k2.cli.data", "synthetic chat/tool-use data, pretraining corpus, held-out benchmarks"),
    "eval": ("kimi_k2.cli.eval", "avg@k and tool-call accuracy of an OpenAI-compatible endpoint on held-out tasks"),
}


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of `kimi-k2 NAME` (imports that command's module)."""
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"kimi-k2 {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    return parser


def parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse `kimi-k2 ARGV` -> (the command's parser, its arguments); argparse's SystemExit on a usage error."""
    top = argparse.ArgumentParser(prog="kimi-k2", description="Kimi K2 in PyTorch",
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog="commands:\n" + "\n".join(f"  {k:<10} {v[1]}" for k, v in COMMANDS.items()))
    top.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv[:1])  # prints help, or a clear "invalid choice" error, and exits
    parser = command_parser(argv[0])
    args = parser.parse_args(argv[1:])
    args.command = argv[0]
    resolve_model(parser, args)
    return parser, args


def main(argv: list[str] | None = None) -> int:
    """`kimi-k2 ARGV` -> exit status: 0 done, 1 runtime error, 2 usage error (`options.py`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, args = parse(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except (CommandError, ValueError, OSError) as e:  # bad input (a model, a file, a value): what, not a traceback
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
