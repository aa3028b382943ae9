"""`kimi-k2 serve`: the OpenAI- and Anthropic-compatible HTTP server over one model directory (uvicorn)."""

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
    p.add_argument("--log-level", default="info")


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
    d = check_model_dir(args.model)
    if d is None:
        return 2
    import uvicorn

    from kimi_k2.engine import AsyncLLMEngine, EngineConfig, LLMEngine
    from kimi_k2.server.app import build_app
    from kimi_k2.server.state import ServerState

    overrides = {k: v for k, v in (("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs))
                 if v is not None}
    engine = LLMEngine.from_pretrained(d, config=EngineConfig(**overrides))
    if engine.tokenizer is None:
        print(f"kimi-k2 serve: {d} has no tokenizer (tiktoken.model)", file=sys.stderr)
        return 2
    names = args.served_model_name or [d.resolve().name]
    state = ServerState(AsyncLLMEngine(engine), engine.tokenizer, names, engine.model_config.vocab_size,
                        args.api_key, args.default_max_tokens)
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
