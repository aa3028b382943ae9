"""FSDP2 + expert-parallel training on this machine: tokens/s and per-rank memory for 1, 2 and 4 processes, and the
Newton-Schulz share of a step (distributed MuonClip: each matrix orthogonalized once, by one rank).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fsdp.py [--preset k2-small] [--procs 1 2 4] [--steps 6]

Each process count runs the real `Trainer.train_step` under torchrun (gloo): 1 process = the plain model;
N > 1 = FSDP2 over N ranks with the routed experts split N ways ([parallel] dp_shard = N, ep = N). Every rank runs
micro_batch x seq tokens per step (weak scaling: the global batch grows with N). After one warm-up step, `--steps`
steps are timed; per rank: wall time of the step and of the optimizer step, Newton-Schulz compute (wall and CPU
seconds of the process) and its all_to_all communication (max over ranks of each rank's median), and the bytes of
parameters + gradients + optimizer state held (counted from the tensors' storages) against total / N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from kimi_k2.parallel import init_distributed
    from kimi_k2.train.recipe import Recipe
    from kimi_k2.train.trainer import Trainer

    info = init_distributed()
    n = info.world_size
    recipe = Recipe.from_dict({
        "model": {"preset": args.preset},
        "data": {"paths": [args.data], "seq_len": args.seq},
        "optim": {"name": "muonclip", "lr": 1e-3},
        "schedule": {"kind": "constant", "total_steps": 1000},
        "train": {"out_dir": args.out, "micro_batch": args.micro_batch, "progress": False, "threads": 1},
        "parallel": {"dp_shard": n, "ep": n} if n > 1 else {},
    })
    trainer = Trainer(recipe, info)
    opt_wall: list[float] = []
    opt_cpu: list[float] = []
    step = trainer.optimizer.step

    def timed_step(*a, **k):
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(*a, **k)
        opt_wall.append(time.perf_counter() - t0)
        opt_cpu.append(time.process_time() - c0)
        return out

    trainer.optimizer.step = timed_step
    rows = []
    for s in range(args.steps + 1):
        t0 = time.perf_counter()
        stats = trainer.train_step(s, track_logits=True)
        wall = time.perf_counter() - t0
        ns = trainer.optimizer.ns_stats
        if s:  # the first step warms up
            rows.append({"wall": wall, "opt": opt_wall[-1], "opt_cpu": opt_cpu[-1], "ns": ns.ns_seconds,
                         "ns_cpu": ns.ns_cpu_seconds, "comm": ns.comm_seconds, "tokens": stats.tokens,
                         "matrices": ns.matrices, "rounds": ns.rounds, "loss": stats.loss})
    mine = {"rank": info.rank, "steps": rows, "memory": trainer.memory[info.rank].as_dict()}
    every = [mine]
    if n > 1:
        every = [None] * n
        dist.all_gather_object(every, mine)
    if info.rank == 0:
        Path(args.result).write_text(json.dumps(every))
    if dist.is_initialized():
        dist.destroy_process_group()
    del torch


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="k2-small")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    from kimi_k2.config import K2Config

    vocab = K2Config.from_preset(args.preset).vocab_size
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.npy"
        np.save(data, np.random.default_rng(0).integers(2, vocab, 400_000, dtype=np.int32))
        load = [os.getloadavg()[0]]
        for n in args.procs:
            result = Path(tmp) / f"result{n}.json"
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            cmd = [*(launch if n > 1 else [sys.executable]), __file__, "--worker", "--preset", args.preset,
                   "--steps", str(args.steps), "--micro-batch", str(args.micro_batch), "--seq", str(args.seq),
                   "--data", str(data), "--out", str(Path(tmp) / f"run{n}"), "--result", str(result)]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode:
                sys.exit(f"{n} processes failed:\n{proc.stderr[-5000:]}")
            results[n] = json.loads(result.read_text())
            load.append(os.getloadavg()[0])
    one = results.get(1)
    base_ns_cpu = median(one[0]["steps"], "ns_cpu") if one else None
    base_opt_cpu = median(one[0]["steps"], "opt_cpu") if one else None
    print(f"preset {args.preset}, {args.micro_batch} x {args.seq} tokens per rank per step, median of {args.steps} "
          f"steps; load average {', '.join(f'{x:.1f}' for x in load)} (before, after each)")
    print("| processes | tokens/s | step s | optimizer wall-s | optimizer CPU-s "
          "| ... vs 1/N of 1 process + all_to_all | NS CPU-s | ... vs 1/N of 1 process | all_to_all s "
          "| NS share of step | held MB | total MB / N | held / (total/N) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, ranks in results.items():
        steps = [r["steps"] for r in ranks]
        wall = statistics.median(max(s[i]["wall"] for s in steps) for i in range(len(steps[0])))
        tokens = steps[0][0]["tokens"]
        opt = max(median(s, "opt") for s in steps)
        opt_cpu = max(median(s, "opt_cpu") for s in steps)
        ns_cpu = max(median(s, "ns_cpu") for s in steps)
        comm = max(median(s, "comm") for s in steps)
        ns_share = max(median(s, "ns") / median(s, "wall") for s in steps)
        held = max(r["memory"]["held"] for r in ranks)
        total = ranks[0]["memory"]["total"]
        vs = f"{ns_cpu / (base_ns_cpu / n):.2f}" if base_ns_cpu else "-"
        vs_opt = f"{opt_cpu / (base_opt_cpu / n + comm):.2f}" if base_opt_cpu else "-"
        print(f"| {n} | {tokens / wall:,.0f} | {wall:.3f} | {opt:.3f} | {opt_cpu:.3f} | {vs_opt} | {ns_cpu:.3f} | {vs} "
              f"| {comm:.3f} | {ns_share:.1%} | {held / 1e6:.2f} | {total / n / 1e6:.2f} | {held / (total / n):.3f} |")
    print("\nper rank:", json.dumps({n: [{"rank": r["rank"], "ns_matrices": r["steps"][0]["matrices"],
                                          "rounds": r["steps"][0]["rounds"],
                                          "held": r["memory"]["held"], "ns_gathered": r["memory"]["ns_gathered"],
                                          "sharded_target": r["memory"]["sharded_target"]} for r in ranks]
                                     for n, ranks in results.items()}))


if __name__ == "__main__":
    main()
