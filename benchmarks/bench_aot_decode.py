"""The AOTInductor decode (`decode_backend="aoti"`) against the torch.compile'd one (`"inductor"`), side by side.

Each round starts one fresh process per backend (alternating, one thread each) that loads the model, builds its
decoder (`warm_up`: compile / cache hit / package load), times --steps decode steps per batch size straight on the
decoder (no engine around it: CPU time per step) and reports its peak RSS (VmHWM), whether dynamo / inductor / sympy
/ triton were imported, and the largest |logit| difference of its last step from the eager `DecodeStep`.

    python benchmarks/bench_aot_decode.py --model k2-small --quantization none,int8 --batches 1,32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HEAVY = ("torch._dynamo", "torch._inductor", "sympy", "triton")


def worker(backend: str, model_name: str, quantization: str | None, batches: list[int], steps: int,
           context: int) -> dict:
    import torch

    from kimi_k2.engine.loader import load_model
    from kimi_k2.engine.paged_cache import LatentPool
    from kimi_k2.model.decode import DecodeStep, decode_weights

    torch.set_num_threads(1)
    model = load_model(model_name, torch.float32, quantization=quantization)
    per_seq = -(-(context + 1) // 16)
    pool = LatentPool(model.config, max(batches) * per_seq, 16, torch.float32)
    pool.kv.normal_(generator=torch.Generator().manual_seed(0))
    wall, cpu = time.perf_counter(), time.process_time()
    if backend == "aoti":
        from kimi_k2.engine.aot_decode import AotDecoder as Decoder
    else:
        from kimi_k2.engine.compiled_decode import CompiledDecoder as Decoder
    decoder = Decoder(model, pool)
    decoder.warm_up()
    out = {"startup_wall_s": time.perf_counter() - wall, "startup_cpu_s": time.process_time() - cpu, "step_ms": {}}
    with torch.inference_mode():
        for B in batches:
            tokens = [(7 * b + 3) % model.config.vocab_size for b in range(B)]
            positions = [context - b % 4 for b in range(B)]
            tables = [list(range(b * per_seq, (b + 1) * per_seq)) for b in range(B)]
            decoder._run(tokens, positions, tables)
            cpu = time.process_time()
            for _ in range(steps):
                logits, _ = decoder._run(tokens, positions, tables)
            out["step_ms"][B] = (time.process_time() - cpu) / steps * 1e3
    out["peak_rss_mib"] = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
    out["heavy_imports"] = sorted({m for m in sys.modules if m in HEAVY})
    with torch.inference_mode():
        ps = pool.page_size
        pages = torch.tensor([t[:-(-max(positions) // ps)] for t in tables])
        ref, _ = DecodeStep(model.config, model.model.rotary.attention_factor, ps)(
            decode_weights(model), torch.tensor(tokens), torch.tensor(positions), pages, pool.kv)
    out["max_logit_diff"] = (logits - ref).abs().max().item()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="k2-small")
    ap.add_argument("--quantization", default="none,int8", help="comma list of none, fp16, int8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--context", type=int, default=64, help="tokens already cached per sequence")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        backend, quant = args.worker.split(":")
        print(json.dumps(worker(backend, args.model, None if quant == "none" else quant, batches, args.steps,
                                args.context)))
        return
    print(f"load average before: {os.getloadavg()}", flush=True)
    for quant in args.quantization.split(","):
        for r in range(args.rounds):
            res = {}
            for backend in ("inductor", "aoti"):
                cmd = [sys.executable, __file__, "--worker", f"{backend}:{quant}", "--model", args.model,
                       "--batches", args.batches, "--steps", str(args.steps), "--context", str(args.context)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{backend} {quant} failed:\n{proc.stderr[-3000:]}")
                res[backend] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{args.model} {quant} round {r} {backend}: {json.dumps(res[backend])}", flush=True)
            a, i = res["aoti"], res["inductor"]
            ratios = {B: i["step_ms"][B] / a["step_ms"][B] for B in map(str, batches)}
            print(f"{args.model} {quant} round {r}: aoti step speed-up (inductor ms / aoti ms) "
                  f"{ {B: round(x, 3) for B, x in ratios.items()} }, peak RSS aoti / inductor "
                  f"{a['peak_rss_mib'] / i['peak_rss_mib']:.3f}, start-up {i['startup_wall_s']:.1f} s -> "
                  f"{a['startup_wall_s']:.1f} s", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
