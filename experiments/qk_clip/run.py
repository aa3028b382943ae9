"""Experiment 2: do max attention logits grow past tau under high-LR Muon on a small K2, and does QK-Clip hold them?

Runs from the same init on the same batches: Muon (RMS-matched; MuonClip with tau = inf, so the max logits are
recorded but nothing is clipped), MuonClip with threshold tau, and AdamW for reference (at a lower lr: at Muon's it
does not learn). Task: copy a random token string [BOS x_1..x_n SEP x_1..x_n], loss on the copy; copying
needs sharp (large-logit) attention, which is what grows.

    .venv/bin/python experiments/qk_clip/run.py            # writes results.json and PNGs next to this file
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from kimi_k2.config import K2Config  # noqa: E402
from kimi_k2.model import K2ForCausalLM  # noqa: E402
from kimi_k2.train import MuonClip, param_groups  # noqa: E402

HERE = Path(__file__).parent
BOS, SEP = 0, 1


def copy_batch(gen: torch.Generator, batch: int, n: int, vocab: int) -> torch.Tensor:
    x = torch.randint(2, vocab, (batch, n), generator=gen)
    return torch.cat([torch.full((batch, 1), BOS), x, torch.full((batch, 1), SEP), x], dim=1)  # [B, 2n + 2]


def copy_loss(model: nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    logits = model(ids)[:, n + 1 : -1]  # positions SEP .. x_{n-1} of the copy predict x_1 .. x_n
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, n + 2 :].flatten())


@torch.no_grad()
def max_logit_on(model: K2ForCausalLM, attn_inputs: dict[int, tuple]) -> float:
    """Max logit of every attention re-run on the inputs it saw in the step's forward (a check, not part of
    training: MuonClip itself needs no second pass)."""
    out = []
    for i, layer in enumerate(model.model.layers):
        layer.self_attn(*attn_inputs[i])
        out.append(layer.self_attn.max_logits.max().item())
        layer.self_attn.max_logits = None
    return max(out)


def train(args: argparse.Namespace, cfg: K2Config, tau: float, muon: bool = True) -> dict[str, list[float]]:
    torch.manual_seed(args.seed)
    model = K2ForCausalLM.from_config(cfg, dtype=torch.float32)
    base_lr = args.lr if muon else args.adamw_lr
    groups = param_groups(model, lr=base_lr, weight_decay=args.wd)
    for g in groups:
        g["use_muon"] = g["use_muon"] and muon
    opt = MuonClip(groups)
    opt.attach_qk_clip(model, tau)  # tau = inf: the max logits are recorded, nothing is clipped
    data, val_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(10_000 + args.seed)
    val = copy_batch(val_gen, 256, args.n, cfg.vocab_size)
    log: dict[str, list[float]] = {"loss": [], "max_logit": [], "max_logit_after_clip": [], "heads_clipped": [],
                                   "val_step": [], "val_loss": []}
    attn_inputs: dict[int, tuple] = {}  # each attention's (x, cos, sin) in the step's forward, to re-check after
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: attn_inputs.__setitem__(i, tuple(
            t.detach() for t in a[:3])))
    for step in range(args.steps):
        lr = base_lr * min(1.0, (step + 1) / args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss = copy_loss(model, copy_batch(data, args.batch, args.n, cfg.vocab_size), args.n)
        loss.backward()
        opt.step()
        s = opt.qk_clip_stats
        log["loss"].append(loss.item())
        log["max_logit"].append(s.max_logits.max().item())  # seen in this step's forward
        log["max_logit_after_clip"].append(max_logit_on(model, attn_inputs))  # same inputs, updated+clipped weights
        log["heads_clipped"].append(int(s.heads_clipped.sum()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            with torch.no_grad():
                log["val_step"].append(step + 1)
                log["val_loss"].append(copy_loss(model, val, args.n).item())
            model.train()
            print(f"  tau={tau:g} step {step + 1}: loss {loss.item():.3f} val {log['val_loss'][-1]:.3f} "
                  f"max logit {log['max_logit'][-1]:.1f} heads clipped {log['heads_clipped'][-1]}")
    return log


def plot(runs: dict[str, dict[str, list[float]]], tau: float, out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for (name, log), color in zip(runs.items(), ("C0", "C1", "C2"), strict=False):
        axes[0].plot(log["max_logit"], color=color, label=f"{name}: max logit in the step's forward")
        axes[1].plot(log["loss"], color=color, alpha=0.35, label=f"{name}: train")
        axes[1].plot(log["val_step"], log["val_loss"], color=color, marker="o", ms=3, label=f"{name}: val")
        axes[2].plot(log["heads_clipped"], color=color, label=name)
    axes[0].axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau:g}")
    axes[0].set(xlabel="step", ylabel="max pre-softmax logit (all layers, heads)", yscale="log")
    axes[1].set(xlabel="step", ylabel="copy loss (nats/token)", yscale="log")
    axes[2].set(xlabel="step", ylabel="heads clipped in the step (of all layers)")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Small K2 (MLA + MoE), copy task, high-LR Muon: with and without QK-Clip")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-2)
    ap.add_argument("--adamw-lr", type=float, default=3e-3, help="AdamW diverges to no learning at --lr here")
    ap.add_argument("--wd", type=float, default=0.0)
    ap.add_argument("--tau", type=float, default=30.0)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--n", type=int, default=24, help="length of the string to copy")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = K2Config.from_preset("k2-tiny").replace(num_hidden_layers=2, max_position_embeddings=256,
                                                    rope_scaling=None)
    t0 = time.time()
    runs = {"Muon (no clip)": train(args, cfg, math.inf), f"MuonClip (tau={args.tau:g})": train(args, cfg, args.tau),
            f"AdamW lr={args.adamw_lr:g} (no clip)": train(args, cfg, math.inf, muon=False)}
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.tau, args.out / "max_logits_and_loss.png")
    summary = {name: {"final_val_loss": log["val_loss"][-1], "peak_max_logit": max(log["max_logit"]),
                      "peak_max_logit_after_clip": max(log["max_logit_after_clip"]),
                      "steps_with_clipping": sum(h > 0 for h in log["heads_clipped"])} for name, log in runs.items()}
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "config": cfg.to_dict(), "summary": summary,
              "runs": runs, "seconds": time.time() - t0}
    (args.out / "results.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
