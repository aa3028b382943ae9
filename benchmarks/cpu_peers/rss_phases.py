"""Where a kimi-k2 process's peak RSS comes from: VmRSS / VmHWM (MiB) after each phase of what worker.py does.

    python benchmarks/cpu_peers/rss_phases.py --model /work/peers/work/k2-medium --modes fp32,fp16,int8

Each mode runs in a fresh process (peaks do not carry over), as run.py's workers do: import torch; import the
engine; load the checkpoint (at int8 / fp16: quantized while read); lay the weights out for the compiled decode
(`prepare_decode_layout`); start the engine (page pool, compile + warm-up of the decode graph); generate (prefill of
--prompt tokens, --new greedy tokens). `floor` is a process that only imports torch: the part no change of ours can
remove. The weight bytes column is what the model's parameters and buffers hold (each storage counted once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODES = {"fp32": {}, "fp16": {"quantization": "fp16"}, "int8": {"quantization": "int8"}}


def status_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def weight_mib(model) -> float:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total / 2**20


def phases(model_dir: str, mode: str, threads: int, prompt: int, new: int) -> list[dict]:
    """Run the phases in this process -> [{phase, rss, hwm}]."""
    out = []

    def mark(name: str, **extra: float) -> None:
        rss, hwm = status_mib()
        out.append({"phase": name, "rss": round(rss, 1), "hwm": round(hwm, 1), **extra})

    mark("python")
    import torch

    torch.set_num_threads(threads)
    mark("import torch")
    if mode == "floor":
        return out
    from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams
    from kimi_k2.engine.loader import load_model
    from kimi_k2.model.decode import prepare_decode_layout

    mark("import kimi_k2")
    model = load_model(model_dir, torch.float32, **MODES[mode])
    mark("load", weights=round(weight_mib(model), 1))
    prepare_decode_layout(model)
    mark("layout", weights=round(weight_mib(model), 1))
    max_len = prompt + new + 1
    config = EngineConfig(page_size=16, num_pages=-(-max_len // 16), max_model_len=max_len, max_num_seqs=1,
                          max_num_batched_tokens=max(2048, max_len), enable_prefix_caching=False, compile_decode=True)
    engine = LLMEngine(model, config=config)
    mark("engine + compile")
    ids = [int(i) for i in torch.randint(0, model.config.vocab_size // 2, (prompt,), generator=torch.Generator()
                                        .manual_seed(0))]
    engine.generate([ids], SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    mark("generate")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (e.g. run.py's work/k2-medium)")
    ap.add_argument("--modes", default="fp32,fp16,int8", help="comma-separated: fp32, fp16, int8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run this mode here, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(phases(args.model, args.one, args.threads, args.prompt, args.new)))
        return
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads)}
    print(f"{args.model}, load average {os.getloadavg()[0]:.1f}; VmRSS / VmHWM MiB after each phase")
    for mode in ["floor", *args.modes.split(",")]:
        if mode != "floor" and mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        cmd = [sys.executable, __file__, "--model", args.model, "--one", mode, "--threads", str(args.threads),
               "--prompt", str(args.prompt), "--new", str(args.new)]
        rows = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        cells = [f"{r['phase']} {r['rss']:.0f}/{r['hwm']:.0f}" + (f" (weights {r['weights']:.0f})" if "weights" in r
                                                                  else "") for r in rows]
        print(f"{mode:>5}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
