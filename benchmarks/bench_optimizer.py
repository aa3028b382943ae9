"""Optimizer step time: MuonClip vs torch.optim.Muon(+AdamW) vs AdamW on a K2 preset's parameters, and MuonClip's
step (plus QK-Clip and the max-logit tracking it needs) as a fraction of one forward+backward of that model.

    .venv/bin/python benchmarks/bench_optimizer.py --preset k2-small --batch 8 --seq 256
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.train import MuonClip, QKClip, param_groups


def timed(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """name -> (median wall ms, median process-CPU ms). Cases run interleaved, one call each per round, so a load
    change on a shared machine hits them all alike; CPU time (all threads) is the less load-sensitive measure."""
    for fn in cases.values():
        fn()  # warm-up: allocate optimizer state, caches
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    return {k: (1e3 * statistics.median(wall[k]), 1e3 * statistics.median(cpu[k])) for k in cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="k2-small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    cfg = K2Config.from_preset(args.preset)
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(cfg, dtype=torch.float32, device=args.device)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=args.device)
    qk_clip = QKClip(model)
    qk_clip.enable()
    clip_copy = QKClip(copy.deepcopy(model), tau=1e-3)  # every head above tau (the worst case), on a spare copy

    def fwd_bwd(track: bool) -> Callable[[], None]:
        def run() -> None:
            for _, attn in qk_clip.layers:  # tracking switches attention to the explicit path that forms the logits
                attn.track_max_logits = track
            model.zero_grad(set_to_none=False)
            logits = model(ids)
            nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
            sync()
        return run

    def step_of(opts: list[torch.optim.Optimizer]) -> Callable[[], None]:
        def step() -> None:
            for o in opts:
                o.step()
            sync()
        return step

    fwd_bwd(True)()  # gradients for the optimizers, max logits for QK-Clip
    saved = [attn.max_logits for _, attn in qk_clip.layers]

    def clip() -> None:
        for (_, attn), s in zip(clip_copy.layers, saved, strict=True):  # apply() consumes the recorded maxima
            attn.max_logits = s
        clip_copy.apply()
        sync()

    groups = param_groups(model, lr=1e-4, weight_decay=0.1)
    muon_params = [p for g in groups if g["use_muon"] for p in g["params"]]
    other_params = [p for g in groups if not g["use_muon"] for p in g["params"]]
    cases: dict[str, Callable[[], object]] = {
        "fwd_bwd": fwd_bwd(False),
        "fwd_bwd_tracking_max_logits": fwd_bwd(True),
        "step_muonclip_fp32_ns": step_of([MuonClip(groups)]),
        "step_muonclip_bf16_ns": step_of([MuonClip(param_groups(model, lr=1e-4), ns_dtype=torch.bfloat16)]),
        "step_muonclip_per_head": step_of([MuonClip(param_groups(model, lr=1e-4, per_head=True))]),
        "step_torch_muon+adamw": step_of([
            torch.optim.Muon(muon_params, lr=1e-4, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(other_params, lr=1e-4, betas=(0.9, 0.95)),
        ]),
        "step_torch_adamw_all": step_of([torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))]),
        "qk_clip_apply": clip,
    }
    res = timed(cases, args.rounds)
    ratios = {}
    for i, kind in enumerate(("wall", "cpu")):
        fb = res["fwd_bwd"][i]
        ratios[f"muonclip_step / fwd_bwd ({kind})"] = res["step_muonclip_fp32_ns"][i] / fb
        ratios[f"torch_muon+adamw_step / fwd_bwd ({kind})"] = res["step_torch_muon+adamw"][i] / fb
        ratios[f"adamw_step / fwd_bwd ({kind})"] = res["step_torch_adamw_all"][i] / fb
        extra = res["step_muonclip_fp32_ns"][i] + res["qk_clip_apply"][i] + res["fwd_bwd_tracking_max_logits"][i] - fb
        ratios[f"muonclip step + qk_clip + tracking / fwd_bwd ({kind})"] = extra / fb

    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {n_params / 1e6:.2f}M params ({sum(p.numel() for p in muon_params) / 1e6:.2f}M on Muon), "
          f"batch {args.batch} x {args.seq}, {args.device}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"  {'case':40s} {'wall ms':>10s} {'cpu ms':>10s}   (median of {args.rounds} interleaved rounds)")
    for k, (w, c) in res.items():
        print(f"  {k:40s} {w:10.1f} {c:10.1f}")
    for k, v in ratios.items():
        print(f"  {k:55s} {v:6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "ms_wall_cpu": res, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
