"""What every command shares: the MODEL argument, `--dtype`, checked numbers, and the two kinds of error.

Exit status (`kimi_k2.cli.main`): 0 done; 2 a usage error (argparse's own, or `UsageError`: arguments that parse
but do not go together), printed after the usage line; 1 a runtime error (`CommandError`, and the `ValueError` /
`OSError` of bad input: a missing model, an unreadable file), printed as `kimi-k2 CMD: error: MESSAGE`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kimi_k2.checkpoint import hub
from kimi_k2.config import PRESETS, K2Config

DTYPES = ("bfloat16", "float16", "float32")
MODEL_FILES = "config.json, *.safetensors, and for text tiktoken.model + tokenizer_config.json"


class CommandError(Exception):
    """A runtime error: `kimi-k2 CMD: error: MESSAGE`, exit status 1."""


class UsageError(Exception):
    """Arguments that parse but do not go together: the usage line, `kimi-k2 CMD: error: MESSAGE`, exit status 2."""


def add_model(parser: argparse.ArgumentParser, help: str, default: str | None = None, required: bool = True) -> None:
    """MODEL as a positional (`vllm serve MODEL`), also accepted as `--model MODEL`; `resolve_model` merges them.
    Without a default, MODEL is required unless `required=False` (then args.model may be None)."""
    text = help if default is None else f"{help} (default: {default})"
    parser.add_argument("model", nargs="?", metavar="MODEL", help=text)
    parser.add_argument("--model", dest="model_flag", metavar="MODEL", help="the same as the MODEL positional")
    parser.set_defaults(model_default=default, model_required=required and default is None)


def resolve_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """args.model <- the positional, or --model, or the command's default; usage error if they differ or none."""
    if not hasattr(args, "model_flag"):
        return
    positional, flag = args.model, args.model_flag
    if positional is not None and flag is not None and positional != flag:
        parser.error(f"MODEL given twice, as {positional!r} and as --model {flag!r}: pass it once")
    args.model = positional or flag or args.model_default
    if args.model is None and args.model_required:
        parser.error("the following arguments are required: MODEL (or --model MODEL)")
    del args.model_flag, args.model_default, args.model_required


def add_dtype(parser: argparse.ArgumentParser, default: str, help: str = "weight and compute dtype") -> None:
    parser.add_argument("--dtype", default=default, choices=DTYPES, help=f"{help} (default: {default})")


def add_device(parser: argparse.ArgumentParser) -> None:
    """`--device`: where the model, the latent cache, the inputs and sampling live (`kimi_k2.engine.device`)."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="cpu, cuda or cuda:N (default: auto, cuda when available, else cpu)")


def add_enforce_eager(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enforce-eager", action="store_true",
                        help="CUDA: decode eagerly instead of replaying CUDA graphs per batch size (as vLLM's flag)")


def add_compile(parser: argparse.ArgumentParser) -> None:
    """--compile (the compiled CPU decode) and --decode-backend (how its graph is built), for `generate` / `serve`."""
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode steps through a compiled graph of the whole model (default: on where it applies: "
                             "the CPU with float32, int8 or fp16 weights; otherwise eager, logged)")
    parser.add_argument("--decode-backend", choices=["inductor", "aoti"], default="inductor",
                        help="how the compiled decode is built: inductor (torch.compile in this process: the "
                             "single-sequence graph at start-up, the batched one in the background from the first "
                             "batch) or aoti (AOTInductor in a subprocess, cached under $KIMI_K2_CACHE/aoti, run by "
                             "torch's C++ runner: one graph for every batch, a restart loads it in under a second)")


def device(args: argparse.Namespace):
    """args.device resolved (`resolve_device`); a device this process cannot use is a UsageError."""
    from kimi_k2.engine.device import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device: {e}") from None


def placement(args: argparse.Namespace):
    """(the engine's device, whether the compiled CPU decode runs) for `generate` / `serve`: --device resolved, and
    the combinations of --tensor-parallel-size, --ep, --quantization and --compile that cannot run are UsageErrors.
    The compiled decode is on by default on the CPU; eager (logged) where it cannot run."""
    tp = args.tensor_parallel_size
    if tp > 1 and (args.ep is not None or args.quantization or args.compile):
        raise UsageError("--tensor-parallel-size goes without --ep, --quantization and --compile")
    where = device(args)
    if args.quantization and where.type != "cpu":
        raise UsageError(f"--quantization {args.quantization} is a CPU format: drop it or pass --device cpu")
    if args.decode_backend != "inductor" and args.compile is False:
        raise UsageError(f"--decode-backend {args.decode_backend} builds the compiled decode: drop --no-compile")
    if args.compile and where.type != "cpu":
        raise UsageError("--compile is the CPU decode path; on CUDA decode runs eagerly or through CUDA graphs")
    return where, args.compile is not False and args.ep is None and tp == 1 and where.type == "cpu"


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def model_dir(model: str, what: str = "a Kimi-format model directory", revision: str | None = None,
              cache_dir: str | None = None) -> Path:
    """The model directory `model` names (a local directory, or a Hugging Face repo id `org/name` resolved through
    the Hub cache, `kimi_k2.checkpoint.hub`), or a CommandError that says what to pass."""
    d = Path(model)
    if (d / "config.json").is_file():
        return d
    if hub.is_repo_id(model):
        try:
            d = hub.resolve(model, revision, cache_dir)
        except hub.HubError as e:
            raise CommandError(f"no model directory {model}, and as a Hugging Face repo id: {e}") from None
        if (d / "config.json").is_file():
            return d
        raise CommandError(f"the Hugging Face snapshot of {model} at {d} has no config.json")
    raise CommandError(
        f"no model at {model} (no config.json there): pass MODEL, {what} ({MODEL_FILES}). Train K2-Nano with "
        f"`kimi-k2 train --config recipes/k2-nano-instruct.toml` (after its base recipe; see recipes/) and pass its "
        f"final checkpoint directory, or convert a Hugging Face Kimi K2 checkpoint with `kimi-k2 convert`")


def model_config(model: str) -> K2Config:
    """The config of a model directory or a preset, or a CommandError that says what to pass."""
    if not Path(model).exists() and model in PRESETS:
        return K2Config.from_preset(model)
    if hub.is_repo_id(model):
        try:
            return K2Config.from_pretrained(hub.resolve(model, files=hub.CONFIG_FILES))
        except hub.HubError as e:
            raise CommandError(f"no model directory {model}, and as a Hugging Face repo id: {e}") from None
    if not (Path(model) / "config.json").is_file() and not Path(model).is_file():
        raise CommandError(f"no model at {model} (no config.json there): pass MODEL, a model directory with a "
                           f"config.json or a preset ({', '.join(PRESETS)})")
    return K2Config.from_pretrained(model)
