"""`kimi-k2 serve`: the OpenAI- and Anthropic-compatible HTTP server over one model directory (uvicorn).

With `--ep N` under torchrun the routed experts are split over N ranks (`kimi_k2.deploy.serve_ep`):
    torchrun --nproc-per-node N -m kimi_k2.cli serve --ep N --model DIR ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "models/k2-nano-instruct"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="Kimi-format model dir (config.json, weights, tokenizer)")
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
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="weight dtype")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="split the routed experts over N ranks: `torchrun --nproc-per-node N -m kimi_k2.cli serve "
                        "--ep N ...` (rank 0 serves HTTP, the others run their experts; CPU, gloo)")
    p.add_argument("--compile", action="store_true",
                   help="single-stream decode through one torch.compile'd graph (needs --dtype float32; compiles on "
                        "the first request, ~30 s on a CPU)")
    p.add_argument("--log-level", default="info")
    # request limits (kimi_k2.server.limits.ServerLimits holds the defaults)
    from kimi_k2.server.limits import ServerLimits as L

    p.add_argument("--max-request-bytes", type=int, default=L.max_request_bytes,
                   help="request body size limit, answered 413 before reading, as nginx client_max_body_size "
                        "(default %(default)s)")
    p.add_argument("--max-stop-sequences", type=int, default=L.max_stop_sequences,
                   help="stop strings per request (default %(default)s)")
    p.add_argument("--max-stop-chars", type=int, default=L.max_stop_chars,
                   help="characters per stop string (default %(default)s)")
    p.add_argument("--max-tools", type=int, default=L.max_tools, help="tools per request (default %(default)s)")
    p.add_argument("--max-schema-bytes", type=int, default=L.max_schema_bytes,
                   help="JSON size of a request's tool and response_format schemas together (default %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt tokens (default: the context - 1)")
    p.add_argument("--max-queued-requests", type=int, default=L.max_queued_requests,
                   help="requests waiting to start; more are answered 429 with Retry-After (default %(default)s)")
    p.add_argument("--request-timeout", type=float, default=L.request_timeout_s, metavar="SECONDS",
                   help="per-request time limit, arrival to last token; past it 504 or a stream error (0: none; "
                        "default %(default)s)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (as vLLM does); by default --api-key protects it too")


def server_limits(args: argparse.Namespace):
    from kimi_k2.server.limits import ServerLimits

    return ServerLimits(max_request_bytes=args.max_request_bytes, max_stop_sequences=args.max_stop_sequences,
                        max_stop_chars=args.max_stop_chars, max_tools=args.max_tools,
                        max_schema_bytes=args.max_schema_bytes, max_prompt_tokens=args.max_prompt_tokens,
                        max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout or None)


def check_model_dir(model: str) -> Path | None:
    d = Path(model)
    if (d / "config.json").is_file():
        return d
    print(f"kimi-k2 serve: no model at {d} (no config.json there). Pass --model DIR with a Kimi-format model "
          f"directory (config.json, *.safetensors, tiktoken.model, tokenizer_config.json): train K2-Nano with "
          f"`kimi-k2 train --config recipes/k2-nano-instruct.toml` (after its base recipe; see recipes/) and pass "
          f"its final checkpoint directory, or convert a Hugging Face Kimi K2 checkpoint with `kimi-k2 convert`.",
          file=sys.stderr)
    return None


def run(args: argparse.Namespace) -> int:
    if args.api_key == "":
        where = "KIMI_K2_API_KEY is set but empty" if os.environ.get("KIMI_K2_API_KEY") == "" else "--api-key is empty"
        print(f"kimi-k2 serve: {where}: give a key, or unset it to serve without one", file=sys.stderr)
        return 2
    server_limits(args)  # bad limit values fail before the model loads
    d = check_model_dir(args.model)
    if d is None:
        return 2
    if not (d / "tiktoken.model").is_file():
        print(f"kimi-k2 serve: {d} has no tokenizer (tiktoken.model)", file=sys.stderr)
        return 2
    import torch

    from kimi_k2.engine import EngineConfig, LLMEngine

    if args.compile and (args.dtype != "float32" or args.ep is not None):
        print("kimi-k2 serve: --compile needs --dtype float32 and no --ep", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs),
                                   ("compile_decode", args.compile or None)) if v is not None}
    config, dtype = EngineConfig(**overrides), getattr(torch, args.dtype)
    if args.ep is None:
        return serve(args, d, LLMEngine.from_pretrained(d, config=config, dtype=dtype))
    from kimi_k2.deploy.serve_ep import launch_error, run_expert_parallel

    if (error := launch_error(args.ep)) is not None:
        print(f"kimi-k2 serve: {error}", file=sys.stderr)
        return 2
    return run_expert_parallel(d, config, dtype, lambda engine: serve(args, d, engine))


def serve(args: argparse.Namespace, d: Path, engine) -> int:
    """Serve `engine` over HTTP until uvicorn stops (SIGINT/SIGTERM drain in-flight requests first)."""
    import uvicorn

    from kimi_k2.engine import AsyncLLMEngine
    from kimi_k2.server.app import build_app
    from kimi_k2.server.state import ServerState

    names = args.served_model_name or [d.resolve().name]
    limits = server_limits(args)
    state = ServerState(AsyncLLMEngine(engine, limits.max_queued_requests), engine.tokenizer, names,
                        engine.model_config.vocab_size, args.api_key, args.default_max_tokens, limits,
                        args.public_metrics)
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
