"""Greedy generation with expert parallelism: `torchrun --nproc-per-node W -m kimi_k2.cli.generate_ep --model DIR
--prompt-ids 1,2,3 [--prompt-ids 4,5,6] --max-new-tokens 8 --out result.json` (also `kimi-k2 generate-ep ...`).

gloo on CPU, NCCL when CUDA is available (rank r uses cuda:LOCAL_RANK). Without torchrun (or with one rank) the
unsharded model runs in this process. Rank 0 writes the JSON: token ids, which tensors each rank read, and the
logits with --logits.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from kimi_k2.model import K2ForCausalLM
from kimi_k2.parallel import CachedStepper, DistributedRunner, greedy_generate, load_expert_parallel


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--prompt-ids", type=_ids, action="append", required=True,
                   help="comma-separated token ids; repeat for a batch of equal-length prompts")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tp-attention", action="store_true", help="split MLA by heads over the ranks (else replicated)")
    p.add_argument("--out", type=Path, help="JSON result file (rank 0)")
    p.add_argument("--logits", action="store_true", help="include the logits of every generated token in --out")


def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    max_len = len(args.prompt_ids[0]) + args.max_new_tokens
    if world == 1:
        model = K2ForCausalLM.from_pretrained(args.model, dtype=dtype)
        tokens, logits = greedy_generate(CachedStepper(model, max_len), args.prompt_ids, args.max_new_tokens)
        _report(args, tokens, logits, 1, [sorted(model.state_dict())])
        return 0
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device != "cpu" else "gloo")
    try:
        rank = dist.get_rank()
        model, read = load_expert_parallel(args.model, rank, world, dtype, device, tp_attention=args.tp_attention)
        runner = DistributedRunner(CachedStepper(model, max_len))
        reads: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(reads, read)
        if rank != 0:
            runner.serve()
            return 0
        try:
            tokens, logits = greedy_generate(runner.step, args.prompt_ids, args.max_new_tokens)
        finally:
            runner.shutdown()
        _report(args, tokens, logits, world, reads)
        return 0
    finally:
        dist.destroy_process_group()


def _report(args: argparse.Namespace, tokens: list[list[int]], logits: torch.Tensor, world: int,
            reads: list[list[str]]) -> None:
    print(json.dumps({"world": world, "tokens": tokens}))
    if args.out:
        result = {"world": world, "tokens": tokens, "read": reads}
        if args.logits:
            result["logits"] = logits.cpu().tolist()
        args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kimi_k2.cli.generate_ep", description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
