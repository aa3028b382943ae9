"""Experiment 1: MuonClip (Muon, RMS-matched to AdamW) vs AdamW on the same small K2, data, schedule and LR sweep.

    .venv/bin/python experiments/muon_vs_adamw/run.py [--lrs 1.5e-3 3e-3 6e-3] [--jobs 2]

1. corpus (kimi_k2.data.corpus default sources) -> 2048-token BPE (kimi_k2.tokenizer.trainer) -> work/tokens.npy
2. for each optimizer and lr: `kimi-k2 train --config recipe.toml` (validation loss every 20 steps)
3. per optimizer the lr with the lowest final validation loss; target = the best AdamW run's final validation loss;
   tokens each best run needs to reach it (linear interpolation between evaluations); PNG plots, results.json.
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


def run_dir(opt: str, lr: float) -> Path:
    return WORK / "runs" / f"{opt}_lr{lr:g}"


def train(opt: str, lr: float) -> Path:
    out = run_dir(opt, lr)
    if (out / "checkpoints").exists():  # finished (or resumable): the trainer resumes
        print(f"{out.name}: resuming/skipping")
    cmd = [sys.executable, "-m", "kimi_k2.cli", "train", "--config", str(HERE / "recipe.toml"), "--out", str(out),
           "--set", f"optim.name='{opt}'", "--set", f"optim.lr={lr}"]
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


def analyze(lrs: list[float]) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {(o, lr): val_curve(run_dir(o, lr)) for o in OPTIMIZERS for lr in lrs}
    final = {k: float(v[1][-1]) for k, v in curves.items()}
    best = {o: min(lrs, key=lambda lr, o=o: final[(o, lr)]) for o in OPTIMIZERS}
    target = final[("adamw", best["adamw"])]
    reach = {o: tokens_to_reach(*curves[(o, best[o])], target) for o in OPTIMIZERS}
    result = {
        "lrs": lrs,
        "final_val_loss": {f"{o}@{lr:g}": final[(o, lr)] for o, lr in curves},
        "best_lr": best,
        "target_val_loss": target,
        "tokens_to_target": reach,
        "adamw_over_muon_tokens": reach["adamw"] / reach["muonclip"] if reach["muonclip"] else None,
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (o, lr), (tok, loss) in curves.items():
        ax.plot(tok / 1e3, loss, color="C0" if o == "adamw" else "C3", alpha=1.0 if lr == best[o] else 0.35,
                marker=".", label=f"{o} lr={lr:g}")
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="target (best AdamW final)")
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
        ax.plot(lrs, [final[(o, lr)] for lr in lrs], marker="o", label=o, color="C0" if o == "adamw" else "C3")
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
    ap.add_argument("--lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3])
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each uses one thread)")
    ap.add_argument("--analyze-only", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    if not args.analyze_only:
        prepare()
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: train(*job), [(o, lr) for lr in args.lrs for o in OPTIMIZERS]))
    print(json.dumps(analyze(args.lrs), indent=2))


if __name__ == "__main__":
    main()
