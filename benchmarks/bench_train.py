"""Training throughput on CPU: our trainer (K2ForCausalLM + MuonClip / AdamW) vs HF transformers
DeepseekV3ForCausalLM + torch.optim.Muon (match_rms_adamw, AdamW for the rest) / AdamW, same config and batch.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_train.py [--preset k2-small] [--batch 4] [--seq 256]

One step = forward + backward + gradient clipping + optimizer step over batch x seq tokens, fp32 weights. Ours is the
real `Trainer.train_step` (MoE sequence aux loss, aux-free bias update, per-head max logits and QK-Clip with muonclip);
HF's is the plain loop. The systems take turns, `--rounds` rounds of `--steps` steps each after one warm-up step, so
background load hits all alike; the median round is reported, in tokens per wall-clock second and per CPU second of
this process (time.process_time: all its threads), the latter being far less sensitive to other jobs on a shared box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kimi_k2.config import K2Config
from kimi_k2.train.recipe import Recipe
from kimi_k2.train.trainer import Trainer


def ours(preset: str, batch: int, seq: int, optim: str, data: Path, out: Path) -> Callable[[int], None]:
    recipe = Recipe.from_dict({
        "model": {"preset": preset},
        "data": {"paths": [str(data)], "seq_len": seq},
        "optim": {"name": optim, "lr": 1e-3},
        "schedule": {"kind": "constant", "total_steps": 1000},
        "train": {"out_dir": str(out), "micro_batch": batch, "grad_clip": 1.0, "progress": False},
    })
    trainer = Trainer(recipe)
    return lambda step: trainer.train_step(step, track_logits=trainer.qk_clip is not None)


def hf(preset: str, batch: int, seq: int, optim: str, data: Path) -> Callable[[int], None]:
    import transformers

    d = K2Config.from_preset(preset).to_dict()
    d["model_type"] = "deepseek_v3"
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**d)).train()
    named = list(model.named_parameters())
    if optim == "muon":
        hidden = [p for n, p in named if p.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n]
        rest = [p for n, p in named if not (p.ndim == 2 and "embed_tokens" not in n and "lm_head" not in n)]
        opts = [torch.optim.Muon(hidden, lr=1e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
                torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)]
    else:
        opts = [torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)]
    tokens = torch.from_numpy(np.load(data).astype(np.int64))
    rows = tokens[: (len(tokens) // (seq + 1)) * (seq + 1)].view(-1, seq + 1)

    def step(i: int) -> None:
        idx = torch.arange(i * batch, (i + 1) * batch) % len(rows)
        x, y = rows[idx, :-1], rows[idx, 1:]
        logits = model(input_ids=x).logits
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="k2-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    vocab = K2Config.from_preset(args.preset).vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "tokens.npy"
        np.save(data, np.random.default_rng(0).integers(0, vocab, 200_000, dtype=np.int64))
        systems = {
            "ours K2ForCausalLM + MuonClip": ours(args.preset, args.batch, args.seq, "muonclip", data, Path(tmp) / "a"),
            "ours K2ForCausalLM + AdamW": ours(args.preset, args.batch, args.seq, "adamw", data, Path(tmp) / "b"),
            "HF DeepseekV3 + torch.optim.Muon": hf(args.preset, args.batch, args.seq, "muon", data),
            "HF DeepseekV3 + AdamW": hf(args.preset, args.batch, args.seq, "adamw", data),
        }
        rates: dict[str, list[float]] = {name: [] for name in systems}
        cpu_rates: dict[str, list[float]] = {name: [] for name in systems}
        step_no = dict.fromkeys(systems, 0)
        for name, fn in systems.items():  # warm-up
            fn(0)
            step_no[name] = 1
        for _ in range(args.rounds):
            for name, fn in systems.items():
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    fn(step_no[name])
                    step_no[name] += 1
                n_tokens = args.steps * args.batch * args.seq
                rates[name].append(n_tokens / (time.perf_counter() - t0))
                cpu_rates[name].append(n_tokens / (time.process_time() - c0))
    print(f"preset {args.preset}, batch {args.batch} x {args.seq} tokens, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")
    print("| system | tokens / CPU-s (median) | tokens / wall-s (median) | wall rounds |")
    print("|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(cpu_rates[name]):.0f} | {statistics.median(r):.0f} | "
              f"{', '.join(f'{x:.0f}' for x in r)} |")
    print(json.dumps({name: [statistics.median(cpu_rates[name]), statistics.median(r)] for name, r in rates.items()}))


if __name__ == "__main__":
    main()
