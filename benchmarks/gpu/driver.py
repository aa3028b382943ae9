"""GPU benchmark driver (issue 16): roofline, kernel micro-benchmarks, HF transformers `generate()` and the kimi_k2
engine's greedy decode on one random K2-shaped model; prints tables and writes one JSON file.

    python benchmarks/gpu/driver.py --out results.json          # on the GPU (run.sh runs the gpu tests first)
    python benchmarks/gpu/driver.py --dry-run --out dry.json    # CPU, tiny shapes, kernels under Triton's interpreter

Sections run in order and each is skipped (with the reason in the file) once the time budget is spent, so the file
is always written. Engine rows run bf16 weights and the same weights as block-FP8 kept resident; `parity` compares
their greedy tokens and logits with HF `generate()` on the same weights (and, on the GPU, fp32 GPU vs fp32 CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

BATCHES = [1, 8, 64, 256]


def _plan(dry_run: bool) -> dict[str, object]:
    """Shapes per mode. GPU: K2 widths (512 + 64 latent, 64 heads = K2 on one GPU, 16 = the bench model), K2 GEMM
    shapes (fused q_a + kv_a 2112 x 7168, fused expert gate+up 4096 x 7168, expert down 7168 x 2048, o_proj
    7168 x 8192); dry run: the same code at toy sizes."""
    if dry_run:
        return {"model": "k2-tiny", "device": "cpu", "batches": [1, 4], "fp8_batches": [1], "prompt_len": 8,
                "new_tokens": 6,
                "mla": [(2, 4, 9)], "mla_widths": (32, 16), "page": 4, "gemm_shapes": [(160, 256)], "gemm_m": [2],
                "warmup": 0, "reps": 1, "hf_batches": [1]}
    return {"model": "k2-bench-4b", "device": "cuda", "batches": BATCHES, "fp8_batches": [1, 64],
            "prompt_len": 128, "new_tokens": 64,
            "mla": [(1, 64, 4096), (8, 64, 4096), (64, 16, 2048), (256, 16, 1024)], "mla_widths": (512, 64),
            "page": 64, "gemm_shapes": [(2112, 7168), (4096, 7168), (7168, 2048), (7168, 8192)],
            "gemm_m": [1, 64, 256], "warmup": 5, "reps": 20, "hf_batches": [1, 8]}


def _env(device) -> dict[str, object]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device), "triton_interpret": os.environ.get("TRITON_INTERPRET", "0")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=list(torch.cuda.get_device_capability(device)),
                   gpu_memory_GB=p.total_memory / 1e9, sms=p.multi_processor_count)
    return env


def _table(rows: list[dict[str, object]], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _targets(results: dict[str, object], fp8_checkpoint_bytes: int) -> dict[str, object]:
    """Issue 16's targets from what was measured; None where a section has not produced its rows."""
    def by_batch(name: str) -> dict[int, dict[str, object]]:
        rows = results.get(name)
        return {r["batch"]: r for r in rows} if isinstance(rows, list) else {}

    bf16, fp8, hf = by_batch("engine_decode"), by_batch("engine_decode_fp8"), by_batch("hf_generate")
    return {
        "single_stream_roofline_fraction bf16 (>= 0.5)": bf16[1]["roofline_fraction"] if 1 in bf16 else None,
        "single_stream_roofline_fraction fp8 (>= 0.5)": fp8[1]["roofline_fraction"] if 1 in fp8 else None,
        "64_streams_over_hf_single_stream (>= 20)":
            bf16[64]["decode_tok_s"] / hf[1]["decode_tok_s"] if 64 in bf16 and 1 in hf else None,
        "fp8_weight_memory_over_fp8_checkpoint (~1; kv_b_proj stays bf16)":
            fp8[1]["weights_GB"] * 1e9 / fp8_checkpoint_bytes if 1 in fp8 else None,
    }


def _write(path: Path, results: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="results JSON file")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton kernels under the interpreter")
    ap.add_argument("--budget-s", type=float, default=330.0, help="time after which remaining sections are skipped")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    if args.dry_run:
        torch.set_num_threads(1)  # toy shapes: threads only contend on a shared CPU

    from benchmarks.gpu import kernels, models, roofline

    plan = _plan(args.dry_run)
    device = torch.device(plan["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    results: dict[str, object] = {"mode": "dry-run" if args.dry_run else "gpu", "plan": plan, "env": _env(device)}
    config = models.BENCH_MODELS[plan["model"]]
    from kimi_k2.model.info import model_info

    fp8_checkpoint_bytes = model_info(config).fp8_bytes
    context = plan["prompt_len"] + plan["new_tokens"] // 2  # mean context over the decode
    state: dict[str, object] = {}

    def roofline_section() -> list[dict[str, object]]:
        return roofline.roofline_table(config, plan["batches"], context)

    def kernels_section() -> list[dict[str, object]]:
        r, dr = plan["mla_widths"]
        return (kernels.mla_decode_rows(device, plan["mla"], r, dr, plan["page"], plan["warmup"], plan["reps"])
                + kernels.fp8_gemm_rows(device, plan["gemm_shapes"], plan["gemm_m"], plan["warmup"], plan["reps"]))

    def hf_section() -> list[dict[str, object]]:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        state["hf"] = models.random_hf_model(config, device, dtype)
        return [models.hf_generate(state["hf"], device, plan["prompt_len"], plan["new_tokens"], batch=b)
                for b in plan["hf_batches"]]

    def engine_rows(precision: str, batches: list[int]) -> list[dict[str, object]]:
        if "hf" not in state:
            raise RuntimeError("not run: needs the HF model of the hf_generate section")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = state[precision] = models.k2_model(state["hf"], config, device, dtype, fp8=precision == "fp8")
        rows = models.engine_decode(model, device, batches, plan["prompt_len"], plan["new_tokens"])
        for row in rows:  # fraction of the HBM roofline at this batch and precision
            row["roofline_fraction"] = row["decode_tok_s"] / roofline.step_bytes(config, row["batch"], context,
                                                                                    precision)["tok_s"]
        return rows

    def parity_section() -> list[dict[str, object]]:
        if "hf" not in state:
            raise RuntimeError("not run: needs the HF model of the hf_generate section")
        dtype = "bf16" if device.type == "cuda" else "fp32"
        engines = {f"kimi_k2 {p} ({dtype} activations)": state[p] for p in ("bf16", "fp8") if p in state}
        rows = models.greedy_parity(state["hf"], engines, device, plan["prompt_len"], 16)
        if device.type == "cuda":  # fp32 on the GPU against fp32 on the CPU, same weights (a smaller model)
            small = models.random_hf_model(models.BENCH_MODELS["k2-tiny"], torch.device("cpu"), torch.float32)
            gpu32 = models.k2_model(small, models.BENCH_MODELS["k2-tiny"], device, torch.float32)
            cpu32 = models.k2_model(small, models.BENCH_MODELS["k2-tiny"], torch.device("cpu"), torch.float32)
            rows += [dict(r, engine="kimi_k2 fp32 cuda vs HF fp32 cpu") for r in
                     models.greedy_parity(small, {"gpu": gpu32}, torch.device("cpu"), 16, 16)]
            rows += [dict(r, engine="kimi_k2 fp32 cpu vs HF fp32 cpu") for r in
                     models.greedy_parity(small, {"cpu": cpu32}, torch.device("cpu"), 16, 16)]
        return rows

    sections = {"roofline": roofline_section, "kernels": kernels_section, "hf_generate": hf_section,
                "engine_decode": lambda: engine_rows("bf16", plan["batches"]),
                "engine_decode_fp8": lambda: engine_rows("fp8", plan["fp8_batches"]), "parity": parity_section}
    for name, fn in sections.items():
        if time.perf_counter() - t0 > args.budget_s:
            results[name] = {"skipped": f"time budget of {args.budget_s:.0f} s spent"}
            continue
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # one section failing must not lose the others
            results[name] = {"skipped" if str(e).startswith("not run") else "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc(limit=5)}
        print(f"[{name}] {time.perf_counter() - t:.1f} s", file=sys.stderr)
        results["targets"] = _targets(results, fp8_checkpoint_bytes)
        results["wall_s"] = time.perf_counter() - t0
        _write(args.out, results)  # after every section: a run killed later still leaves what it measured

    cols = {"roofline": ["precision", "batch", "context", "weight_bytes", "kv_bytes", "step_s", "tok_s"],
            "kernels": ["kernel", "impl", "batch", "heads", "context", "M", "N", "K", "ms", "latent_GB_s",
                        "weight_GB_s", "max_err"],
            "hf_generate": ["batch", "prompt_len", "new_tokens", "prefill_s", "decode_tok_s", "ms_per_token",
                            "peak_memory_GB"],
            "engine_decode": ["batch", "decode_tok_s", "ms_per_token", "roofline_fraction", "weights_GB",
                              "peak_memory_GB", "attention", "cuda_graphs"],
            "engine_decode_fp8": ["batch", "decode_tok_s", "ms_per_token", "roofline_fraction", "weights_GB",
                                  "peak_memory_GB", "attention", "cuda_graphs"],
            "parity": ["engine", "tokens", "equal_prefix", "max_logit_err", "logit_scale"],
            "targets": []}  # dicts: printed as JSON
    for name, c in cols.items():
        print(f"\n## {name}")
        r = results[name]
        print(_table(r, c) if isinstance(r, list) else json.dumps({k: v for k, v in r.items() if k != "traceback"},
                                                                  indent=1))
    print(f"\nwrote {args.out} in {results['wall_s']:.1f} s")
    return 1 if any(isinstance(results[n], dict) and "error" in results[n] for n in sections) else 0


if __name__ == "__main__":
    raise SystemExit(main())
