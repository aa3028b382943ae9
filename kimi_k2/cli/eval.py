"""`kimi-k2 eval`: run held-out benchmarks against an OpenAI-compatible endpoint and print avg@k and tool accuracy."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import openai

from kimi_k2.eval.benchmarks import load_tasks
from kimi_k2.eval.episode import Sampling
from kimi_k2.eval.runner import evaluate, summarize, table, write_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible API root")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument("--model", default="kimi-k2")
    parser.add_argument("--tasks", default="tool_use,chat",
                        help="comma-separated shipped benchmark names (kimi_k2/eval/tasks) or JSONL paths")
    parser.add_argument("-k", type=int, default=4, help="samples per task (avg@k)")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-tokens", type=int, default=512, help="per assistant message")
    parser.add_argument("--max-steps", type=int, default=4, help="assistant messages per user turn")
    parser.add_argument("--seed", type=int, default=None, help="request seed of sample i is seed + i")
    parser.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    parser.add_argument("--limit", type=int, default=None, help="first N tasks of each benchmark")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--out", type=Path, default=Path("eval_results"),
                        help="writes NAME.results.jsonl and NAME.summary.json here")


def run(args: argparse.Namespace) -> int:
    benchmarks = [load_tasks(t, args.limit) for t in args.tasks.split(",") if t]
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=args.timeout, max_retries=2)
    sampling = Sampling(args.model, args.temperature, args.max_tokens, args.max_steps, args.seed)
    summaries, failed, episodes = {}, [], 0
    for name, tasks in benchmarks:
        records = evaluate(client, tasks, sampling, args.k, args.concurrency)
        summaries[name] = summarize(records)
        write_results(args.out, name, records, summaries[name])
        failed += [r["error"] for r in records if r["error"] is not None]
        episodes += len(records)
    print(table(summaries))
    print(json.dumps({n: round(s["all"]["avg@k"], 4) for n, s in summaries.items()}))
    if len(failed) == episodes:
        raise OSError(f"every one of the {episodes} episodes ended in an API error, the first: {failed[0]}")
    if failed:
        print(f"{len(failed)} of {episodes} episodes ended in an API error; see {args.out}/*.results.jsonl")
    return 0
