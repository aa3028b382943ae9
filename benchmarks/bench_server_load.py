"""Load test of `kimi-k2 serve` on loopback: C concurrent streaming chat clients run N requests in all.

Every stream must complete (finish_reason, usage, [DONE]) with no error; prints requests/s, time to first token
(p50/p99) and generated tokens/s. Without --model it builds a random model (preset, seeded) with a tokenizer
trained on the stdlib docs, so it runs anywhere:

    python benchmarks/bench_server_load.py --clients 64 --requests 256 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def build_model(out: Path, preset: str) -> Path:
    import sysconfig

    import torch

    from kimi_k2.config import K2Config
    from kimi_k2.model import K2ForCausalLM
    from kimi_k2.tokenizer import Tokenizer
    from kimi_k2.tokenizer.trainer import train_tokenizer

    train_tokenizer([Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"], 1024, out)
    tok = Tokenizer.from_pretrained(out)
    config = K2Config.from_preset(preset)
    config.vocab_size, config.bos_token_id, config.eos_token_id = tok.n_vocab, tok.bos_id, tok.eos_id
    torch.manual_seed(0)
    K2ForCausalLM.from_config(config, torch.float32).save_pretrained(out)
    return out


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))] if xs else float("nan")


async def one(client: httpx.AsyncClient, model: str, i: int, max_tokens: int, headers: dict) -> dict:
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i, "messages": [{"role": "user", "content": f"Request {i}: tell me a story."}]}
    t0 = time.perf_counter()
    ttft, finish, usage, done, chunks = None, None, None, False, 0
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["delta"].get("content") or c["delta"].get("tool_calls"):
                    chunks += 1
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                finish = c["finish_reason"] or finish
    if not (done and finish and usage):
        return {"error": f"incomplete stream (done={done}, finish={finish}, usage={usage})"}
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "tokens": usage["completion_tokens"],
            "latency": time.perf_counter() - t0}


async def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int,
                   api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    results: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                try:
                    results.append(await one(client, model, i, max_tokens, headers))
                except Exception as e:  # a transport failure counts as an error of that request
                    results.append({"error": repr(e)})

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = [r["ttft"] for r in ok]
    return {"requests": requests, "clients": clients, "max_tokens": max_tokens, "errors": len(results) - len(ok),
            "first_errors": [r["error"] for r in results if "error" in r][:3], "wall_s": round(wall, 3),
            "requests_per_s": round(len(ok) / wall, 3), "ttft_p50_s": round(percentile(ttfts, 50), 4),
            "ttft_p99_s": round(percentile(ttfts, 99), 4),
            "completion_tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2)}


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Poll `url`/health until it answers 200; SystemExit if the server process ends or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("server did not start")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model dir (default: a random model of --preset built in a temp dir)")
    p.add_argument("--preset", default="k2-tiny")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--url", help="an already running server (default: start `kimi-k2 serve` on a free port)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url, proc = args.url, None
        model = "bench"
        if url is None:
            model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "model", args.preset)
            port = free_port()
            env = {k: v for k, v in os.environ.items() if k != "KIMI_K2_API_KEY"}  # serve without a key
            proc = subprocess.Popen([sys.executable, "-m", "kimi_k2.cli", "serve", "--model", str(model_dir), "--port",
                                     str(port), "--served-model-name", model, "--max-num-seqs", str(args.clients),
                                     "--log-level", "warning"], env=env)
            url = f"http://127.0.0.1:{port}"
            wait_until_healthy(url, proc, 120)
        else:
            model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        try:
            stats = asyncio.run(run_load(url, model, args.clients, args.requests, args.max_tokens))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    print(json.dumps(stats, indent=2))
    return 1 if stats["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
