"""`kimi-k2 serve [MODEL]`: the OpenAI- and Anthropic-compatible HTTP server over one model (uvicorn).

MODEL is a Kimi-format model directory or a Hugging Face repo id (`moonshotai/Kimi-K2-Thinking`, resolved through the
Hub cache). The command line is vLLM's: the Kimi-K2 deploy guide's `vllm serve $MODEL_PATH --port 8000
--served-model-name kimi-k2 --trust-remote-code --tensor-parallel-size 16 --enable-auto-tool-choice
--tool-call-parser kimi_k2` runs as `kimi-k2 serve ...`. Every vLLM flag here either does what it does in vLLM or,
where it has no meaning for this server (multi-GPU layouts, remote code), is accepted with a logged note saying so.

With `--ep N` under torchrun the routed experts are split over N ranks (`kimi_k2.deploy.serve_ep`):
    torchrun --nproc-per-node N -m kimi_k2.cli serve DIR --ep N ...
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from kimi_k2.checkpoint import hub
from kimi_k2.cli.options import (
    DTYPES,
    CommandError,
    UsageError,
    add_compile,
    add_device,
    add_model,
    model_dir,
    placement,
    positive_int,
)

DEFAULT_MODEL = "models/k2-nano-instruct"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]
log = logging.getLogger("kimi_k2.serve")


def model_len(text: str) -> int:
    """vLLM's --max-model-len spelling: 32768, 32k, 128K, 1m."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a token count such as 32768 or 128k, got {text!r}")
    return positive_int(str(int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]))


def add_vllm_arguments(p: argparse.ArgumentParser) -> None:
    """vLLM's `serve` flags that this server reads, and those it accepts with a note (see `vllm_notes`)."""
    g = p.add_argument_group("vLLM compatibility (`vllm serve` command lines run unchanged)")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted: tool_choice auto is always on here, with grammar-constrained (always valid) calls")
    g.add_argument("--tool-call-parser", choices=["kimi_k2"], default="kimi_k2",
                   help="the Kimi-K2 tool-call format (the only one this server speaks)")
    g.add_argument("--reasoning-parser", choices=["kimi_k2"], default=None,
                   help="kimi_k2: split <think> reasoning from the answer (Kimi-K2-Thinking): OpenAI "
                        "reasoning_content, Anthropic thinking blocks, Responses reasoning items")
    g.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                   help="a Jinja chat template: a file, a built-in name (kimi_k2, kimi_k2_thinking) or the template "
                        "text itself (default: the model directory's)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted: no remote code runs here (the Kimi tokenizer and model are built in)")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of a repo-id MODEL")
    g.add_argument("--download-dir", default=None, help="Hub cache directory for a repo-id MODEL (default: HF_HOME)")
    g.add_argument("--max-num-batched-tokens", type=positive_int, default=None,
                   help="tokens per engine step (prefill chunks + decodes)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="decode eagerly: no compiled CPU decode, no CUDA graphs (as vLLM)")
    g.add_argument("--uvicorn-log-level", choices=LOG_LEVELS, default=None, help="the same as --log-level")
    g.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                   help="split heads, MLPs, shared experts and vocabulary over N torchrun ranks: `torchrun "
                        "--nproc-per-node N -m kimi_k2.cli serve MODEL --tensor-parallel-size N` (NCCL on CUDA, gloo "
                        "on CPU); rank 0 serves HTTP")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size N: whole routed experts per rank instead of 1/N of each")
    # other multi-GPU layouts of vLLM: accepted with a note

    g.add_argument("--pipeline-parallel-size", "-pp", type=positive_int, default=1)
    g.add_argument("--data-parallel-size", "-dp", type=positive_int, default=1)
    g.add_argument("--data-parallel-size-local", type=positive_int, default=None)
    g.add_argument("--data-parallel-address", default=None)
    g.add_argument("--data-parallel-rpc-port", type=int, default=None)
    g.add_argument("--data-parallel-start-rank", type=int, default=None)
    g.add_argument("--headless", action="store_true")
    g.add_argument("--gpu-memory-utilization", type=float, default=None)


def vllm_notes(args: argparse.Namespace) -> list[str]:
    """What the vLLM flags that have no meaning here do instead; UsageError for the one that cannot run at all."""
    if args.headless:
        raise UsageError("--headless (a data-parallel worker without an API server) has no counterpart here: this "
                         "server is one process (or, with --ep N, torchrun ranks behind one API server)")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    notes = []
    if args.trust_remote_code:
        notes.append("--trust-remote-code: accepted; no remote code is run (the Kimi tokenizer and model are built "
                     "in)")
    if args.enable_auto_tool_choice:
        notes.append("--enable-auto-tool-choice: accepted; automatic tool choice is always on, every tool call "
                     "grammar-constrained to a declared tool with valid arguments")
    layout = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name in
              ("pipeline_parallel_size", "data_parallel_size") if getattr(args, name) > 1]
    layout += [f"--{name.replace('_', '-')}" for name in ("data_parallel_size_local", "data_parallel_address",
                                                          "data_parallel_rpc_port", "data_parallel_start_rank")
               if getattr(args, name) is not None]
    layout += ["--enable-expert-parallel"] if args.enable_expert_parallel and args.tensor_parallel_size == 1 else []
    if layout:
        notes.append(f"{' '.join(layout)}: no pipeline or data-parallel replicas here; the model is split only by "
                     "`torchrun --nproc-per-node N -m kimi_k2.cli serve MODEL --tensor-parallel-size N "
                     "[--enable-expert-parallel]` (or `--ep N`)")
    if args.gpu_memory_utilization is not None:
        notes.append(f"--gpu-memory-utilization {args.gpu_memory_utilization}: accepted; the latent cache is sized "
                     "by the engine's memory budget, not a GPU fraction")
    return notes


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, "Kimi-format model directory (config.json, weights, tokenizer) or Hugging Face repo id",
              default=DEFAULT_MODEL)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KIMI_K2_API_KEY"),
                   help="require this key ('Authorization: Bearer KEY' or 'x-api-key'); default $KIMI_K2_API_KEY")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients send (default: the directory name)")
    p.add_argument("--max-model-len", type=model_len, default=None,
                   help="context length, e.g. 32768 or 128k (default: the model's)")
    p.add_argument("--max-num-seqs", type=positive_int, default=None,
                   help="concurrent sequences (default: engine default)")
    p.add_argument("--default-max-tokens", type=int, default=None,
                   help="completion budget of requests that set none (default: the rest of the context)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish on shutdown")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weight dtype; auto (vLLM's default): float32 on the CPU (the fastest on CPUs without native "
                        "bf16, and the compiled decode's), bfloat16 on CUDA")
    p.add_argument("--ep", type=positive_int, default=None, metavar="N",
                   help="split the routed experts over N ranks: `torchrun --nproc-per-node N -m kimi_k2.cli serve "
                        "DIR --ep N ...` (rank 0 serves HTTP, the others run their experts; CPU, gloo)")
    # speed: low-precision weights and the compiled single-stream decode
    p.add_argument("--quantization", choices=["int8", "fp16"], default=None,
                   help="projections as int8 (Q8_0 blocks, int8 matmuls) or fp16 weights, made from the checkpoint "
                        "(fp8/bf16/fp32) at load, one tensor at a time; everything else fp32")
    add_compile(p)
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    add_device(p)
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
    add_vllm_arguments(p)


def server_limits(args: argparse.Namespace):
    from kimi_k2.server.limits import ServerLimits

    return ServerLimits(max_request_bytes=args.max_request_bytes, max_stop_sequences=args.max_stop_sequences,
                        max_stop_chars=args.max_stop_chars, max_tools=args.max_tools,
                        max_schema_bytes=args.max_schema_bytes, max_prompt_tokens=args.max_prompt_tokens,
                        max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout or None)


def run(args: argparse.Namespace) -> int:
    if args.enforce_eager:
        if args.compile:
            raise UsageError("--enforce-eager and --compile contradict each other")
        args.compile = False
    if args.uvicorn_log_level is not None:
        args.log_level = args.uvicorn_log_level
    for note in vllm_notes(args):
        log.warning(note)
    if args.quantization and args.ep is not None:
        raise UsageError("--quantization is not supported with --ep")
    where, compile_decode = placement(args)
    tp = args.tensor_parallel_size
    if args.dtype == "auto":  # fp32 on CPUs (no fast bf16 there; the compiled decode's), bf16 on GPUs
        args.dtype = "float32" if where.type == "cpu" else "bfloat16"
    if args.compile and (args.dtype != "float32" or args.ep is not None):
        raise UsageError("--compile needs --dtype float32 and no --ep")
    if args.api_key == "":
        which = "KIMI_K2_API_KEY is set but empty" if os.environ.get("KIMI_K2_API_KEY") == "" else "--api-key is empty"
        raise UsageError(f"{which}: give a key, or unset it to serve without one")
    try:
        server_limits(args)  # bad limit values fail before the model loads
    except ValueError as e:
        raise UsageError(str(e)) from None
    template = chat_template(args.chat_template)  # a bad template fails before the model loads
    d = model_dir(args.model, revision=args.revision, cache_dir=args.download_dir)
    if not (d / "tiktoken.model").is_file():
        raise CommandError(f"{d} has no tokenizer (tiktoken.model): serve a directory with the model's tokenizer")
    import torch

    from kimi_k2.engine import EngineConfig, LLMEngine

    overrides = {k: v for k, v in (("max_model_len", args.max_model_len), ("max_num_seqs", args.max_num_seqs),
                                   ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    config = EngineConfig(**overrides, compile_decode=compile_decode, decode_backend=args.decode_backend,
                          cuda_graphs=False if args.enforce_eager else None)
    dtype = getattr(torch, args.dtype)
    if tp > 1:
        from kimi_k2.deploy.serve_ep import launch_error, run_tensor_parallel

        if (error := launch_error(tp, "serve", "--tensor-parallel-size")) is not None:
            raise CommandError(error)
        return run_tensor_parallel(d, config, dtype, lambda engine: serve(args, d, engine, template),
                                   args.enable_expert_parallel, where)
    if args.ep is None:
        engine = LLMEngine.from_pretrained(d, config=config, dtype=dtype, quantization=args.quantization, device=where)
        return serve(args, d, engine, template)
    from kimi_k2.deploy.serve_ep import launch_error, run_expert_parallel

    if (error := launch_error(args.ep)) is not None:
        raise CommandError(error)
    return run_expert_parallel(d, config, dtype, lambda engine: serve(args, d, engine, template))


def chat_template(spec: str | None) -> str | None:
    """--chat-template: a file, a built-in template's name, or the template text; None keeps the model's."""
    if spec is None:
        return None
    from kimi_k2.tokenizer.chat_template import BUILTIN_TEMPLATES, builtin_template, compile_template

    if Path(spec).is_file():
        text = Path(spec).read_text(encoding="utf-8")
    elif spec in BUILTIN_TEMPLATES:
        text = builtin_template(spec)
    elif "{{" in spec or "{%" in spec:
        text = spec
    else:
        raise UsageError(f"--chat-template {spec!r} is neither a file, a built-in template "
                         f"({', '.join(BUILTIN_TEMPLATES)}) nor Jinja template text")
    try:
        compile_template(text)
    except ValueError as e:
        raise UsageError(f"--chat-template: {e}") from None
    return text


def serve(args: argparse.Namespace, d: Path, engine, template: str | None = None) -> int:
    """Serve `engine` over HTTP until uvicorn stops (SIGINT/SIGTERM drain in-flight requests first)."""
    import uvicorn

    from kimi_k2.engine import AsyncLLMEngine
    from kimi_k2.server.app import build_app
    from kimi_k2.server.state import ServerState

    names = args.served_model_name or [args.model if hub.is_repo_id(args.model) else d.resolve().name]
    limits = server_limits(args)
    if template is not None:
        engine.tokenizer.chat_template = template
    state = ServerState(AsyncLLMEngine(engine, limits.max_queued_requests), engine.tokenizer, names,
                        engine.model_config.vocab_size, args.api_key, args.default_max_tokens, limits,
                        args.public_metrics, reasoning=args.reasoning_parser == "kimi_k2")
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
