"""PNG curves from training runs' log.jsonl (`kimi-k2 plot`), written to the first RUN_DIR/plots.

One figure per metric: loss (train and validation), lr, grad_norm, max attention logit per layer, QK-Clip heads
clipped per layer, expert-load MaxVio per MoE layer, aux loss. Several runs share each figure (one line per run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCALARS = {"loss": "train loss", "val_loss": "validation loss", "lr": "learning rate", "grad_norm": "gradient norm",
           "aux_loss": "MoE sequence aux loss", "tokens_per_s": "tokens / s"}
PER_LAYER = {"max_logit": "max attention logit", "qk_clip_heads_clipped": "QK-Clip heads clipped",
             "expert_maxvio": "expert load MaxVio"}


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        raise FileNotFoundError(f"{run_dir} has no log.jsonl (not a training run directory?)")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def plot_runs(run_dirs: list[Path], out_dir: Path, x_key: str = "step") -> list[Path]:
    """Write one PNG per metric present in any run; returns the files written."""
    logs = {Path(d).name or str(d): read_log(d) for d in run_dirs}
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in {**SCALARS, **PER_LAYER}.items():
        series = {run: [(r[x_key], r[key]) for r in recs if r.get(key) not in (None, [])] for run, recs in logs.items()}
        series = {run: pts for run, pts in series.items() if pts}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run, pts in series.items():
            xs = [x for x, _ in pts]
            if key in PER_LAYER:
                for i in range(len(pts[0][1])):
                    ax.plot(xs, [v[i] for _, v in pts], label=f"{run} layer {i}" if len(series) > 1 else f"layer {i}")
            else:
                ax.plot(xs, [v for _, v in pts], label=run, marker="." if key == "val_loss" else None)
        if key in ("loss", "val_loss", "grad_norm"):
            ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
