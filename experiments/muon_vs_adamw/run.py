"""Experiment 1: MuonClip (Muon, RMS-matched to AdamW) vs AdamW on the same small K2, data, schedule and LR sweep.

    .venv/bin/python experiments/muon_vs_adamw/run.py [--adamw-lrs ...] [--muon-lrs ...] [--long-steps ...] [--jobs 2]

1. corpus (kimi_k2.data.corpus default sources) -> 2048-token BPE (kimi_k2.tokenizer.trainer) -> work/tokens.npy
2. for each optimizer and lr: `kimi-k2 train --config recipe.toml` (200 steps, validation loss every 20 steps)
3. per optimizer the lr with the lowest final validation loss. Two token counts:
   a. within one schedule: tokens the best Muon run needs to reach the best AdamW run's final validation loss
      (first crossing on the evaluation grid, linear interpolation), against AdamW's full 200 steps;
   b. over whole schedules: the best AdamW lr retrained with longer WSD schedules (--long-steps); the tokens AdamW
      needs to end at the best Muon run's final validation loss (interpolated between schedule lengths).
   PNG plots and results.json next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
OPTIMIZERS = ("adamw", "muonclip")


def prepare(vocab: int = 2048) -> None:
    if (WORK / "tokens.npy").exists():
        return
    from kimi_k2.data.corpus import documents
    from kimi_k2.tokenizer.trainer import train_tokenizer

    docs = [d["text"] for d in documents()]
    tok = train_tokenizer(docs, vocab, WORK / "tokenizer", texts=True)
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d, allow_special=False)
        ids.append(tok.eos_id)
    np.save(WORK / "tokens.npy", np.asarray(ids, dtype=np.int32))
    print(f"{len(docs)} documents, {len(ids)} tokens, vocab {tok.n_vocab}")


def run_dir(opt: str, lr: float, steps: int | None = None) -> Path:
    return WORK / "runs" / (f"{opt}_lr{lr:g}" + (f"_steps{steps}" if steps else ""))


def train(opt: str, lr: float, steps: int | None = None) -> Path:
    out = run_dir(opt, lr, steps)
    if (out / "checkpoints").exists():  # finished or interrupted: the trainer resumes (a finished run returns at once)
        print(f"{out.name}: resuming")
    cmd = [sys.executable, "-m", "kimi_k2.cli", "train", "--config", str(HERE / "recipe.toml"), "--out", str(out),
           "--set", f"optim.name='{opt}'", "--set", f"optim.lr={lr}"]
    if steps:
        cmd += ["--set", f"schedule.total_steps={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name} failed:\n{proc.stderr[-2000:]}")
    print(f"{out.name}: {proc.stdout.strip().splitlines()[-1]}")
    return out


def val_curve(run: Path) -> tuple[np.ndarray, np.ndarray]:
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    pts = [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts])


def tokens_to_reach(tokens: np.ndarray, loss: np.ndarray, target: float) -> float | None:
    """First crossing of `target`, linearly interpolated between evaluations; None if never reached."""
    for i in range(len(loss)):
        if loss[i] <= target:
            if i == 0:
                return float(tokens[0])
            t0, t1, l0, l1 = tokens[i - 1], tokens[i], loss[i - 1], loss[i]
            return float(t0 + (l0 - target) / (l0 - l1) * (t1 - t0))
    return None


def analyze(sweep: dict[str, list[float]], long_steps: list[int]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {(o, lr): val_curve(run_dir(o, lr)) for o in OPTIMIZERS for lr in sweep[o]}
    final = {k: float(v[1][-1]) for k, v in curves.items()}
    best = {o: min(sweep[o], key=lambda lr, o=o: final[(o, lr)]) for o in OPTIMIZERS}
    target = final[("adamw", best["adamw"])]
    reach = {o: tokens_to_reach(*curves[(o, best[o])], target) for o in OPTIMIZERS}
    # (b) AdamW with longer schedules: final (tokens, loss) per schedule length, from the 200-step sweep run up
    ends = [(curves[("adamw", best["adamw"])][0][-1], final[("adamw", best["adamw"])])]
    ends += [(c[0][-1], float(c[1][-1])) for c in (val_curve(run_dir("adamw", best["adamw"], n)) for n in long_steps)]
    muon_final = final[("muonclip", best["muonclip"])]
    adamw_tokens_for_muon = tokens_to_reach(np.array([e[0] for e in ends]), np.array([e[1] for e in ends]),
                                            muon_final)
    result = {
        "lrs": sweep,
        "final_val_loss": {f"{o}@{lr:g}": final[(o, lr)] for o, lr in curves},
        "best_lr": best,
        "target_val_loss": target,
        "tokens_to_target": reach,
        "adamw_over_muon_tokens": reach["adamw"] / reach["muonclip"] if reach["muonclip"] else None,
        "adamw_schedule_ends": [{"tokens": t, "val_loss": v} for t, v in ends],
        "muon_best_final_val_loss": muon_final,
        "adamw_tokens_to_muon_final": adamw_tokens_for_muon,
        "muon_tokens": float(curves[("muonclip", best["muonclip"])][0][-1]),
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (o, lr), (tok, loss) in curves.items():
        ax.plot(tok / 1e3, loss, color="C0" if o == "adamw" else "C3", alpha=1.0 if lr == best[o] else 0.35,
                marker=".", label=f"{o} lr={lr:g}")
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="target (best AdamW final)")
    for n in long_steps:
        tok, loss = val_curve(run_dir("adamw", best["adamw"], n))
        ax.plot(tok / 1e3, loss, color="C2", ls=":", marker=".", alpha=0.7,
                label=f"adamw lr={best['adamw']:g}, {n} steps")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss")
    ax.set_ylim(top=min(7.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Muon (MuonClip, RMS-matched) vs AdamW: validation loss")
    fig.tight_layout()
    fig.savefig(HERE / "val_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for o in OPTIMIZERS:
        color = "C0" if o == "adamw" else "C3"
        ax.plot(sweep[o], [final[(o, lr)] for lr in sweep[o]], marker="o", label=o, color=color)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "lr_sweep.png", dpi=110)
    plt.close(fig)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adamw-lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3])
    ap.add_argument("--muon-lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2])
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses one thread)")
    ap.add_argument("--long-steps", type=int, nargs="*", default=[300, 400],
                    help="longer WSD schedules for the best AdamW lr")
    ap.add_argument("--analyze-only", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    if not args.analyze_only:
        prepare()
        jobs = [("adamw", lr) for lr in args.adamw_lrs] + [("muonclip", lr) for lr in args.muon_lrs]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: train(*job), jobs))
        finals = {lr: float(val_curve(run_dir("adamw", lr))[1][-1]) for lr in args.adamw_lrs}
        best = min(finals, key=finals.__getitem__)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda n: train("adamw", best, n), args.long_steps))
    sweep = {"adamw": args.adamw_lrs, "muonclip": args.muon_lrs}
    print(json.dumps(analyze(sweep, args.long_steps), indent=2))


if __name__ == "__main__":
    main()
