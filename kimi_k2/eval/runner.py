"""Run benchmarks: k samples of every task on a bounded thread pool, then avg@k and tool-call accuracy.

avg@k (the K2 model cards' metric): the mean over tasks of the fraction of a task's k samples that succeed. pass^k
(Tau-bench's reliability metric): the fraction of tasks whose k samples all succeed. The other columns average like
avg@k: per sample over its turns (tool_name, args_correct, answer_ok), its calls (args_valid; 1 when it made none)
or its end state (state_ok), then over samples and tasks.
"""

from __future__ import annotations

import json
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean

import openai

from kimi_k2.eval.episode import Sampling, run_episode

METRICS = ["avg@k", "pass^k", "tool_name", "args_valid", "args_correct", "answer_ok", "state_ok"]


def evaluate(client: openai.OpenAI, tasks: list[dict], sampling: Sampling, k: int, concurrency: int) -> list[dict]:
    """All k samples of all tasks, ordered by (task, sample)."""
    if k < 1 or concurrency < 1:
        raise ValueError(f"k and concurrency must be >= 1, got k={k}, concurrency={concurrency}")
    jobs = [(t, s) for t in tasks for s in range(k)]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(lambda job: run_episode(client, job[0], sampling, job[1]), jobs))


def _sample_metrics(r: dict) -> dict[str, float]:
    turns = r["turns"]
    made = sum(t["calls_made"] for t in turns)
    return {"avg@k": float(r["success"]), "pass^k": float(r["success"]),
            "tool_name": mean(t["tool_name"] for t in turns) if turns else 0.0,
            "args_valid": sum(t["calls_valid"] for t in turns) / made if made else 1.0,
            "args_correct": mean(t["args_correct"] for t in turns) if turns else 0.0,
            "answer_ok": mean(t["answer_ok"] for t in turns) if turns else 0.0,
            "state_ok": float(r["state_ok"])}


def summarize(records: list[dict]) -> dict:
    """{"all": metrics, kind: metrics, ...}; each metrics dict also has n_tasks, k and errors."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(r)
    groups: dict[str, list[str]] = defaultdict(list)
    for task_id, rs in by_task.items():
        groups["all"].append(task_id)
        groups[rs[0]["kind"]].append(task_id)
    out = {}
    for group, ids in groups.items():
        per_task = [{m: (min if m == "pass^k" else mean)(_sample_metrics(r)[m] for r in by_task[i]) for m in METRICS}
                    for i in ids]
        out[group] = {m: mean(t[m] for t in per_task) for m in METRICS} | {
            "n_tasks": len(ids), "k": len(by_task[ids[0]]),
            "errors": sum(r["error"] is not None for i in ids for r in by_task[i])}
    return out


def write_results(out_dir: Path, name: str, records: list[dict], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.results.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out_dir / f"{name}.summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def table(summaries: dict[str, dict]) -> str:
    """Plain-text summary: one row per (benchmark, kind), metrics in percent."""
    head = f"{'benchmark':10s} {'kind':11s} {'tasks':>5s} {'k':>2s} " + " ".join(f"{m:>12s}" for m in METRICS)
    rows = [head, "-" * len(head)]
    for name, summary in summaries.items():
        for group, s in summary.items():
            rows.append(f"{name:10s} {group:11s} {s['n_tasks']:5d} {s['k']:2d} "
                        + " ".join(f"{100 * s[m]:11.1f}%" for m in METRICS)
                        + (f"  ({s['errors']} errors)" if s["errors"] else ""))
    return "\n".join(rows)
