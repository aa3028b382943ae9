"""`kimi-k2 serve [MODEL]`: the OpenAI- and Anthropic-compatible HTTP server over one model directory (uvicorn).

With `--ep N` under torchrun the routed experts are split over N ranks (`kimi_k2.deploy.serve_ep`):
    torchrun --nproc-per-node N -m kimi_k2.cli serve DIR --ep N ...
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kimi_k2.cli.options import CommandError, UsageError, add_dtype, add_model, model_dir, positive_int

DEFAULT_MODEL = "models/k2-nano-instruct"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, "Kimi-format model directory (config.json, weights, tokenizer)", default=DEFAULT_MODEL)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KIMI_K2_API_KEY"),
                   help="require this key ('Authorization: Bearer KEY' or 'x-api-key'); default $KIMI_K2_API_KEY")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send (default: the directory name)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: engine default)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="concurrent sequences (default: engine default)")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="completion budget of requests that set none (default: the rest of the context)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish on shutdown")
    add_dtype(p, "float32", "weight dtype (float32: the fastest on CPUs without native bf16; the compiled decode's)")
    p.add_argument("--ep", type=positive_int, default=None, metavar="N",
                   help="split the routed experts over N ranks: `torchrun --nproc-per-node N -m kimi_k2.cli serve "
                        "DIR --ep N ...` (rank 0 serves HTTP, the others run their experts; CPU, gloo)")
    # speed: low-precision weights and the compiled single-stream decode
    p.add_argument("--quantization", choices=["int8", "fp16"], default=None,
                   help="projections as int8 (Q8_0 blocks, int8 matmuls) or fp16 weights, made from the checkpoint "
                        "(fp8/bf16/fp32) at load, one tensor at a time; everything else fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="single-stream decode through one torch.compile'd graph, compiled at start-up (default: on "
                        "where it applies: float32, int8 or fp16 weights; otherwise eager, logged)")
    p.add_argument("--log-level", default="info")


def run(args: argparse.Namespace) -> int:
    if args.compile and (args.dtype != "float32" or args.ep is not None):
        raise UsageError("--compile needs --dtype float32 and no --ep")
    if args.quantization and args.ep is not None:
        raise UsageError("--quantization is not supported with --ep")
    d = model_dir(args.model)
    if not (d / "tiktoken.model").is_file():
        raise CommandError(f"{d} has no tokenizer (tiktoken.model): serve a directory with the model's tokenizer")
    import torch

    from kimi_k2.engine import EngineConfig, LLMEngine

    compile_decode = args.compile is not False and args.ep is None
    overrides = {k: v for k, v in (("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs))
                 if v is not None}
    config, dtype = EngineConfig(**overrides, compile_decode=compile_decode), getattr(torch, args.dtype)
    if args.ep is None:
        engine = LLMEngine.from_pretrained(d, config=config, dtype=dtype, quantization=args.quantization)
        return serve(args, d, engine)
    from kimi_k2.deploy.serve_ep import launch_error, run_expert_parallel

    if (error := launch_error(args.ep)) is not None:
        raise CommandError(error)
    return run_expert_parallel(d, config, dtype, lambda engine: serve(args, d, engine))


def serve(args: argparse.Namespace, d: Path, engine) -> int:
    """Serve `engine` over HTTP until uvicorn stops (SIGINT/SIGTERM drain in-flight requests first)."""
    import uvicorn

    from kimi_k2.engine import AsyncLLMEngine
    from kimi_k2.server.app import build_app
    from kimi_k2.server.state import ServerState

    names = args.served_model_name or [d.resolve().name]
    state = ServerState(AsyncLLMEngine(engine), engine.tokenizer, names, engine.model_config.vocab_size,
                        args.api_key, args.default_max_tokens)
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
