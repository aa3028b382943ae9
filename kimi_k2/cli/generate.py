"""`kimi-k2 generate MODEL`: complete prompts (text, token ids, or chat messages) with an LLMEngine.

With `--tensor-parallel-size N` under torchrun the model is split over N ranks (heads, MLP columns/rows, vocabulary;
`--enable-expert-parallel`: whole routed experts per rank), NCCL on CUDA, gloo on the CPU:
    torchrun --nproc-per-node N -m kimi_k2.cli generate DIR --tensor-parallel-size N --prompt "Hello"
With `--ep N` only the routed experts are split (CPU, gloo; as `serve --ep`). Rank 0 samples and prints; every rank
runs its part of every step (`kimi_k2.deploy.serve_ep`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kimi_k2.cli.options import (
    CommandError,
    UsageError,
    add_compile,
    add_device,
    add_dtype,
    add_enforce_eager,
    add_model,
    model_config,
    model_dir,
    placement,
    positive_int,
)
from kimi_k2.engine.engine_config import EngineConfig
from kimi_k2.engine.llm_engine import LLMEngine
from kimi_k2.engine.loader import load_model
from kimi_k2.engine.params import CompletionDelta, SamplingParams
from kimi_k2.tokenizer import Tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model(parser, "model directory (its tokenizer files make text prompts possible), or a preset with random "
                      "weights")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    src.add_argument("--prompt-file", type=Path, help="one text prompt per line")
    src.add_argument("--ids", action="append", help="a prompt as space-separated token ids (repeatable)")
    src.add_argument("--messages", type=Path,
                     help="chat messages: a JSON list of {role, content} (one chat) or JSONL, one list per line")
    parser.add_argument("--max-tokens", type=positive_int, default=64, help="new tokens per sample (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default: 0.6)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, help="sampling seed: the same seed and prompt give the same tokens")
    parser.add_argument("-n", type=positive_int, default=1, help="samples per prompt")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", help="generate --max-tokens tokens, EOS or not")
    parser.add_argument("--logprobs", type=int, metavar="K",
                        help="with --json: each new token's logprob and the top K (0..20) alternatives")
    add_dtype(parser, "float32")
    add_device(parser)
    add_enforce_eager(parser)
    parser.add_argument("--max-model-len", type=positive_int, help="default: the model's max_position_embeddings")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample instead of text")
    parser.add_argument("--ep", type=positive_int, metavar="N",
                        help="split the routed experts over N ranks: `torchrun --nproc-per-node N -m kimi_k2.cli "
                             "generate DIR --ep N ...` (CPU, gloo)")
    parser.add_argument("--tp-attention", action="store_true", help="with --ep: also split MLA by heads over the ranks")
    parser.add_argument("--tensor-parallel-size", "-tp", type=positive_int, default=1, metavar="N",
                        help="split the model over N ranks (heads, MLPs, vocabulary): `torchrun --nproc-per-node N -m "
                             "kimi_k2.cli generate DIR --tensor-parallel-size N ...` (NCCL on CUDA, gloo on CPU)")
    parser.add_argument("--enable-expert-parallel", action="store_true",
                        help="with --tensor-parallel-size N: whole routed experts per rank instead of 1/N of each")
    # speed: low-precision weights and the compiled single-stream decode (as `kimi-k2 serve`)
    parser.add_argument("--quantization", choices=["int8", "fp16"], default=None,
                        help="projections as int8 or fp16 weights, made at load; everything else fp32")
    add_compile(parser)


def _ids(lines: list[str]) -> list[list[int]]:
    try:
        return [[int(t) for t in line.split()] for line in lines]
    except ValueError as e:
        raise UsageError(f"--ids takes space-separated integers: {e}") from None


def _prompts(args: argparse.Namespace, tokenizer: Tokenizer | None) -> list[list[int]]:
    if args.ids:
        return _ids(args.ids)
    if tokenizer is None:
        raise CommandError(f"{args.model} has no tokenizer (tiktoken.model): give prompts as --ids")
    if args.messages:
        text = args.messages.read_text()
        chats = [json.loads(line) for line in text.splitlines() if line.strip()] if args.messages.suffix == ".jsonl" \
            else [json.loads(text)]
        return [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) for chat in chats]
    lines = args.prompt or [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    return [tokenizer.encode(line) for line in lines]


def _record(i: int, r: CompletionDelta) -> dict[str, object]:
    rec: dict[str, object] = {"prompt": i, "index": r.index, "text": r.text, "token_ids": r.token_ids,
                              "finish_reason": r.finish_reason}
    if r.logprobs is not None:
        rec["logprobs"] = [{"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top} for lp in r.logprobs]
    return rec


def generate(args: argparse.Namespace, engine: LLMEngine) -> int:
    """Run the prompts through `engine` and print the samples."""
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n, stop=args.stop,
                            ignore_eos=args.ignore_eos, logprobs=args.logprobs)
    prompts = _prompts(args, engine.tokenizer)
    results = engine.generate(prompts, params, use_tqdm=len(prompts) * args.n > 1 and not args.json)
    for i, samples in enumerate(results):
        for r in samples:
            if args.json:
                print(json.dumps(_record(i, r)))
            else:
                head = f"[{i}.{r.index}] " if len(results) * args.n > 1 else ""
                body = r.text if engine.tokenizer is not None else " ".join(map(str, r.token_ids))
                print(f"{head}{body}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.compile and (args.dtype != "float32" or args.ep is not None):
        raise UsageError("--compile needs --dtype float32 and no --ep")
    if args.quantization and args.ep is not None:
        raise UsageError("--quantization is not supported with --ep")
    if args.tp_attention and args.ep is None:
        raise UsageError("--tp-attention splits attention over the --ep ranks: pass --ep N too")
    if args.logprobs is not None and not args.json:
        raise UsageError("--logprobs are printed with --json only")
    if args.ids:
        _ids(args.ids)  # a usage error before the model loads and compiles
    where, compile_decode = placement(args)
    tp, dtype = args.tensor_parallel_size, getattr(torch, args.dtype)
    config = EngineConfig(max_model_len=args.max_model_len, compile_decode=compile_decode,
                          decode_backend=args.decode_backend, cuda_graphs=False if args.enforce_eager else None)
    if tp > 1:
        from kimi_k2.deploy.serve_ep import launch_error, run_tensor_parallel

        d = model_dir(args.model, "a Kimi-format checkpoint directory (each rank reads its part)")
        if (error := launch_error(tp, "generate", "--tensor-parallel-size")) is not None:
            raise CommandError(error)
        return run_tensor_parallel(d, config, dtype, lambda engine: generate(args, engine),
                                   args.enable_expert_parallel, where)
    if args.ep is not None:
        from kimi_k2.deploy.serve_ep import launch_error, run_expert_parallel

        d = model_dir(args.model, "a Kimi-format checkpoint directory (the experts are read per rank)")
        if (error := launch_error(args.ep, "generate")) is not None:
            raise CommandError(error)
        return run_expert_parallel(d, config, dtype, lambda engine: generate(args, engine), args.tp_attention)
    model_config(args.model)  # a missing model: say what to pass
    tokenizer = Tokenizer.from_pretrained(args.model) if (Path(args.model) / "tiktoken.model").is_file() else None
    model = load_model(args.model, dtype, quantization=args.quantization, device=where)
    return generate(args, LLMEngine(model, tokenizer, config))
