"""`kimi-k2 generate`: complete prompts (text, token ids, or chat messages) with an LLMEngine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from kimi_k2.engine.bench import load_model
from kimi_k2.engine.engine_config import EngineConfig
from kimi_k2.engine.llm_engine import LLMEngine
from kimi_k2.engine.params import SamplingParams


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (tokenizer files make text prompts possible) or preset")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    src.add_argument("--prompt-file", type=Path, help="one text prompt per line")
    src.add_argument("--ids", action="append", help="a prompt as space-separated token ids (repeatable)")
    src.add_argument("--messages", type=Path,
                     help="chat messages: a JSON list of {role, content} (one chat) or JSONL, one list per line")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("-n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-model-len", type=int, help="default: the model's max_position_embeddings")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample instead of text")
    # speed: low-precision weights and the compiled single-stream decode (as `kimi-k2 serve`)
    parser.add_argument("--quantization", choices=["int8", "fp16"], default=None,
                        help="projections as int8 or fp16 weights, made at load; everything else fp32")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="single-stream decode through one torch.compile'd graph (default: on where it applies, "
                             "float32 weights; otherwise eager, logged)")


def _prompts(args: argparse.Namespace, tokenizer: Any) -> list[list[int]]:
    if args.ids:
        return [[int(t) for t in line.split()] for line in args.ids]
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer (tiktoken.model): give prompts as --ids")
    if args.messages:
        text = args.messages.read_text()
        chats = [json.loads(line) for line in text.splitlines() if line.strip()] if args.messages.suffix == ".jsonl" \
            else [json.loads(text)]
        return [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) for chat in chats]
    lines = args.prompt or [line for line in args.prompt_file.read_text().splitlines() if line.strip()]
    return [tokenizer.encode(line) for line in lines]


def run(args: argparse.Namespace) -> int:
    if args.compile and (args.dtype != "float32" or args.quantization):
        print("kimi-k2 generate: --compile needs --dtype float32 and no --quantization", file=sys.stderr)
        return 2
    model = load_model(args.model, getattr(torch, args.dtype), quantization=args.quantization)
    tokenizer = None
    if (Path(args.model) / "tiktoken.model").is_file():
        from kimi_k2.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(args.model)
    try:
        config = EngineConfig(max_model_len=args.max_model_len, compile_decode=args.compile is not False)
        engine = LLMEngine(model, tokenizer, config)
    except ValueError as e:
        print(f"kimi-k2 generate: {e}", file=sys.stderr)
        return 2
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed, n=args.n, stop=args.stop)
    try:
        prompts = _prompts(args, tokenizer)
        results = engine.generate(prompts, params, use_tqdm=len(prompts) * args.n > 1)
    except ValueError as e:
        print(f"kimi-k2 generate: {e}", file=sys.stderr)
        return 2
    for i, samples in enumerate(results):
        for r in samples:
            if args.json:
                print(json.dumps({"prompt": i, "index": r.index, "text": r.text, "token_ids": r.token_ids,
                                  "finish_reason": r.finish_reason}))
            else:
                head = f"[{i}.{r.index}] " if len(results) * args.n > 1 else ""
                body = r.text if tokenizer is not None else " ".join(map(str, r.token_ids))
                print(f"{head}{body}")
    return 0
