"""Our engine at each weight precision, against the engine of another checkout (e.g. main) in the same run.

    .venv/bin/python benchmarks/bench_cpu_precision.py [--shape k2-small|k2-100m] [--baseline /work/main]
        [--modes fp32 fp32-compile int8 fp16] [--threads 1] [--prompt 64] [--new 64] [--concurrent 8 32]

Every (checkout, mode) runs in its own subprocess (fresh RSS, fresh torch.compile state), in interleaved rounds;
the same seeded random weights (std 1/sqrt(fan_in)) in each. Per mode:
- decode tok/s of one stream (prompt, then `new` greedy tokens; (new - 1) / (request time - time with new = 1)),
- total generated tok/s of `concurrent` streams (continuous batching), prefill tok/s (one prompt of `--prefill`),
- logit error against fp32 on a fixed token sequence: max |dl| / max |l| and the greedy-argmax agreement,
- peak RSS (VmHWM), and the start-up seconds (weights + the compile warm-up).
Times are CPU seconds (process_time, all threads), the steadier figure on a shared machine; best of `--rounds`.
Shapes: k2-small (preset) and k2-100m (k2-small widened: hidden 1024, 8 layers, 32 experts top-6, moe 256).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "k2-small": {},
    "k2-100m": {"hidden_size": 1024, "intermediate_size": 3072, "moe_intermediate_size": 256, "num_hidden_layers": 8,
                "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 384, "kv_lora_rank": 256,
                "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 32,
                "num_experts_per_tok": 6, "vocab_size": 16384},
}


def child(args: argparse.Namespace) -> None:
    import random

    import torch

    from kimi_k2.config import K2Config
    from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams
    from kimi_k2.model import K2ForCausalLM

    torch.set_num_threads(args.threads)
    start = time.process_time()
    config = K2Config.from_preset("k2-small").replace(**SHAPES[args.shape])
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(config, torch.float32)
    with torch.no_grad():
        for t in model.parameters():
            if t.ndim == 2:
                t.normal_(0.0, t.shape[1] ** -0.5)
    model.eval()
    ids = torch.tensor([random.Random(7).randrange(config.vocab_size) for _ in range(128)])[None]
    with torch.no_grad():
        reference = model(ids)[0]
    quant = args.mode if args.mode in ("int8", "fp16") else None
    if quant:
        from kimi_k2.model.quantized import quantize_model

        quantize_model(model, quant)
    with torch.no_grad():
        logits = model(ids)[0]
    err = float((logits - reference).abs().max() / reference.abs().max())
    agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    rng = random.Random(1)
    n = max(args.concurrent)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(args.prompt)] for _ in range(n)]
    ecfg = EngineConfig(page_size=16, num_pages=-(-(max(args.prompt, args.prefill) + args.new) // 16) * n + 4,
                        max_model_len=max(args.prompt, args.prefill) + args.new, max_num_seqs=n,
                        max_num_batched_tokens=max(2048, args.prefill), enable_prefix_caching=False,
                        compile_decode=args.mode.endswith("compile"))
    engine = LLMEngine(model, config=ecfg)
    startup = time.process_time() - start

    def run(ps: list[list[int]], new: int) -> float:
        t = time.process_time()
        engine.generate(ps, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        return time.process_time() - t

    run(prompts[:1], 4)  # warm-up
    out: dict = {"err": err, "agree": agree, "startup_s": startup}
    one, full = min(run(prompts[:1], 1) for _ in range(2)), min(run(prompts[:1], args.new) for _ in range(2))
    out["decode_tok_s"] = (args.new - 1) / max(full - one, 1e-9)
    out["prefill_tok_s"] = args.prefill / min(run([list(range(2, 2 + args.prefill))], 1) for _ in range(2))
    for c in args.concurrent:
        out[f"c{c}_tok_s"] = c * args.new / run(prompts[:c], args.new)
    with open("/proc/self/status") as f:
        out["peak_rss_mib"] = next(int(x.split()[1]) for x in f if x.startswith("VmHWM")) / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="k2-small", choices=sorted(SHAPES))
    ap.add_argument("--baseline", default=None, help="another checkout to run fp32 / fp32-compile from")
    ap.add_argument("--modes", nargs="+", default=["fp32", "fp32-compile", "int8", "fp16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrent", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        return child(args)
    here = str(Path(__file__).resolve().parents[1])
    runs = [("this", here, m) for m in args.modes]
    if args.baseline:
        runs += [("baseline", args.baseline, m) for m in args.modes if m in ("fp32", "fp32-compile")]
    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for tree, path, mode in runs:
            cmd = [sys.executable, __file__, "--mode", mode, "--shape", args.shape, "--threads", str(args.threads),
                   "--prompt", str(args.prompt), "--prefill", str(args.prefill), "--new", str(args.new),
                   "--concurrent", *map(str, args.concurrent)]
            p = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
            lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            if p.returncode or not lines:
                print(f"{tree} {mode}: failed\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(lines[-1][7:])
            old = best.get((tree, mode))
            best[(tree, mode)] = r if old is None else {k: max(v, old[k]) if k.endswith("tok_s") else min(v, old[k])
                                                        for k, v in r.items()}
    keys = ["decode_tok_s", "prefill_tok_s", *[f"c{c}_tok_s" for c in args.concurrent], "peak_rss_mib", "startup_s",
            "err", "agree"]
    print(f"shape {args.shape}, {args.threads} thread(s), prompt {args.prompt}, new {args.new}, load "
          f"{os.getloadavg()[0]:.1f}")
    print("| checkout | mode | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for (tree, mode), r in best.items():
        print(f"| {tree} | {mode} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
