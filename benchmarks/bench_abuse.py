"""Abuse test of `kimi-k2 serve` on loopback: do abusive clients hurt the well-behaved ones?

One real server (uvicorn, its own process). C well-behaved clients stream chat completions back to back, alone
("quiet") and while abusive clients run ("abuse"), for --rounds rounds in ABBA order. Reported: the well-behaved
clients' time to first token and inter-token latency (gap between content chunks) p50/p99 per phase (pooled, and the
abuse/quiet p99 ratio of each round, whose two phases ran back to back), every abusive request's status and error
(each must be the expected named error, or a served stream for the accepted kinds), the server's 5xx count, CPU
time, and RSS at the start (after a warm-up) and after each phase. Abusers run in their own process
over raw sockets (cheap clients: the CPU they take from a shared box should be the server's doing, not theirs), each
sending at most one request per --pace seconds (--pace 0: back to back, a flood). Without --model it builds a random
model (preset, seeded) with a tokenizer trained on the stdlib docs, so it runs anywhere:

    python benchmarks/bench_abuse.py --clients 64 --abusers 8 --duration 15 --rounds 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server_load import build_model, free_port, percentile, wait_until_healthy  # noqa: E402

KEY = "bench-key"
CYCLE = {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
NEEDS_CHILD = {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}


# ---- well-behaved clients --------------------------------------------------------------------------------------
async def good_client(client: httpx.AsyncClient, model: str, seed: int, max_tokens: int, stop_at: float,
                      out: dict) -> None:
    """Stream chat completions back to back until `stop_at`; record TTFT, gaps between content chunks, errors."""
    n = 0
    while time.perf_counter() < stop_at:
        n += 1
        body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.7, "seed": seed * 1000 + n,
                "messages": [{"role": "user", "content": f"Client {seed}, request {n}: tell me a story."}]}
        last = time.perf_counter()
        first, done = True, False
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    out["errors"].append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["errors"].append(chunk["error"]["message"])
                        break
                    if any(c["delta"].get("content") for c in chunk["choices"]):
                        now = time.perf_counter()
                        (out["ttft"] if first else out["itl"]).append(now - last)
                        first, last = False, now
        except httpx.HTTPError as e:
            out["errors"].append(f"{e!r} after {'no' if first else 'some'} content")
            continue
        out["requests"] += done


async def good_clients(url: str, model: str, clients: int, max_tokens: int, duration: float) -> dict:
    out: dict = {"ttft": [], "itl": [], "errors": [], "requests": 0}
    # idle connections expire before uvicorn's 5 s keep-alive: reusing one the server is closing is a client error
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        stop_at = time.perf_counter() + duration
        await asyncio.gather(*(good_client(client, model, i, max_tokens, stop_at, out) for i in range(clients)))
    return out


# ---- abusive clients -------------------------------------------------------------------------------------------
def abusive_requests(model: str, huge_bytes: int, long_bytes: int) -> list[tuple[str, str, bytes, dict]]:
    """(kind, path, body, expectation): the status and the error's code / type / param; kinds expecting 200 are
    accepted requests (served to the end, or aborted by the client)."""
    chat = {"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    huge = json.dumps({**chat, "messages": [{"role": "user", "content": "x" * huge_bytes}]}).encode()
    long = json.dumps({**chat, "messages": [{"role": "user", "content": "word " * (long_bytes // 5)}]}).encode()
    count = json.dumps({**chat, "messages": [{"role": "user", "content": "word " * (long_bytes // 5)}]}).encode()
    tool = {"type": "function", "function": {"name": "f", "parameters": CYCLE}}
    return [
        ("huge body (Content-Length)", "/v1/chat/completions", huge, {"status": 413, "code": "request_too_large"}),
        ("huge body (chunked)", "/v1/chat/completions", huge, {"status": 413, "code": "request_too_large",
                                                               "chunked": True}),
        ("huge Anthropic body", "/v1/messages", huge, {"status": 413, "type": "request_too_large"}),
        ("prompt provably too long", "/v1/chat/completions", long, {"status": 400, "code": "context_length_exceeded"}),
        ("count_tokens provably too long", "/v1/messages/count_tokens", count, {"status": 400,
                                                                                "type": "invalid_request_error"}),
        ("600k-char stop string", "/v1/chat/completions", json.dumps({**chat, "stop": ["Q" * 600_000]}).encode(),
         {"status": 400, "param": "stop"}),
        ("100 stop strings", "/v1/chat/completions",
         json.dumps({**chat, "stop": [f"s{i}" for i in range(100)]}).encode(), {"status": 400, "param": "stop"}),
        ("$ref cycle response_format", "/v1/chat/completions", json.dumps({**chat, "response_format": {
            "type": "json_schema", "json_schema": {"name": "r", "schema": CYCLE}}}).encode(),
         {"status": 400, "code": None}),
        ("$ref cycle tool, tool_choice required", "/v1/chat/completions", json.dumps({
            **chat, "tools": [tool], "tool_choice": "required"}).encode(), {"status": 400, "code": None}),
        ("recursive required child (Anthropic)", "/v1/messages", json.dumps({
            **chat, "tools": [{"name": "f", "input_schema": NEEDS_CHILD}], "tool_choice": {"type": "any"}}).encode(),
         {"status": 400, "type": "invalid_request_error"}),
        ("16 stop strings of 1000 chars (allowed)", "/v1/chat/completions", json.dumps({
            **chat, "stream": True, "stop": [chr(0x4E00 + i) * 1000 for i in range(16)]}).encode(),
         {"status": 200}),
        ("abort mid-stream", "/v1/chat/completions", json.dumps({**chat, "max_tokens": 200, "stream": True}).encode(),
         {"status": 200, "abort": True}),
    ]


def check(expect: dict, status: int, body: bytes) -> str | None:
    """None when the answer is the expected named error; else what is wrong."""
    if status != expect["status"]:
        return f"status {status}, expected {expect['status']}: {body[:200]!r}"
    if status == 200:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    err = doc.get("error") or {}
    if not err.get("message") or not err.get("type"):
        return f"no named error: {doc}"
    for key in ("code", "type", "param"):
        if key in expect and expect[key] is not None and err.get(key) != expect[key]:
            return f"error {key} {err.get(key)!r}, expected {expect[key]!r}"
    return None


async def one_abuse(host: str, port: int, path: str, raw: bytes, expect: dict) -> tuple[int, str | None, str]:
    """One abusive request over a raw socket (a cheap client: the benchmark measures the server, not httpx); the
    body is sent while the answer is read, as a client that does not wait would."""
    reader, writer = await asyncio.open_connection(host, port)
    # as HTTP clients do, the connection is kept alive (the server then reads and drops the rest of a refused body,
    # so the answer is not lost to a reset); a stream we read to its end asks the server to close it after
    close = "Connection: close\r\n" if expect["status"] == 200 else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{close}")

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            if expect.get("chunked"):
                writer.write((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
                for i in range(0, len(raw), 1 << 16):
                    piece = raw[i:i + (1 << 16)]
                    writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write((head + f"Content-Length: {len(raw)}\r\n\r\n").encode())
                writer.write(raw)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        status = int((await reader.readline()).split()[1])
        length = None
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if status == 200 and expect.get("abort"):
            await reader.read(256)  # the first events, then hang up mid-stream
            return 200, None, "aborted after the first events"
        body = await (reader.readexactly(length) if length is not None else reader.read())
    finally:
        sender.cancel()
        writer.close()
    message = ""
    if status != 200 and body.startswith(b"{"):
        message = (json.loads(body).get("error") or {}).get("message", "")
    return status, check(expect, status, body), message


async def abusers(url: str, model: str, n: int, duration: float, huge_bytes: int, long_bytes: int,
                  only: str | None = None, pace: float = 0.0) -> list[dict]:
    """`n` abusive clients, each cycling through every kind (or those whose name contains `only`) until `duration`
    has passed, one request at a time and at most one per `pace` seconds (0: back to back, a flood)."""
    kinds = [k for k in abusive_requests(model, huge_bytes, long_bytes) if only is None or only in k[0]]
    host, port = url.removeprefix("http://").split(":")
    out: list[dict] = []
    stop_at = time.perf_counter() + duration

    async def run(j: int) -> None:
        i = j
        while time.perf_counter() < stop_at:
            kind, path, raw, expect = kinds[i % len(kinds)]
            i += 1
            next_at = time.perf_counter() + pace
            try:
                status, problem, message = await one_abuse(host, int(port), path, raw, expect)
            except (OSError, ValueError, IndexError) as e:
                status, problem, message = 0, f"transport error {e!r}", ""
            out.append({"kind": kind, "status": status, "problem": problem, "message": message})
            await asyncio.sleep(max(0.0, min(next_at, stop_at) - time.perf_counter()))

    await asyncio.gather(*(run(j) for j in range(n)))
    return out


def abusers_process(url: str, model: str, n: int, duration: float, huge_bytes: int, long_bytes: int,
                    only: str | None, pace: float, conn) -> None:
    results = asyncio.run(abusers(url, model, n, duration, huge_bytes, long_bytes, only, pace))
    t = os.times()
    conn.send((results, t.user + t.system))


# ---- the run -----------------------------------------------------------------------------------------------------
def summarize(good: dict) -> dict:
    ms = lambda x: round(1000 * x, 1)  # noqa: E731
    return {"requests": good["requests"], "errors": len(good["errors"]), "first_errors": good["errors"][:3],
            "ttft_p50_ms": ms(percentile(good["ttft"], 50)), "ttft_p99_ms": ms(percentile(good["ttft"], 99)),
            "itl_p50_ms": ms(percentile(good["itl"], 50)), "itl_p99_ms": ms(percentile(good["itl"], 99)),
            "tokens": len(good["ttft"]) + len(good["itl"])}


def merge(parts: list[dict]) -> dict:
    return {"ttft": [x for p in parts for x in p["ttft"]], "itl": [x for p in parts for x in p["itl"]],
            "errors": [x for p in parts for x in p["errors"]], "requests": sum(p["requests"] for p in parts)}


def abuse_report(results: list[dict]) -> dict:
    kinds: dict[str, dict] = {}
    for r in results:
        k = kinds.setdefault(r["kind"], {"n": 0, "statuses": {}, "problems": [], "example": ""})
        k["n"] += 1
        k["statuses"][r["status"]] = k["statuses"].get(r["status"], 0) + 1
        if r["problem"]:
            k["problems"].append(r["problem"])
        k["example"] = k["example"] or r["message"][:160]
    return kinds


def server_5xx(metrics: str) -> int:
    total = 0
    for line in metrics.splitlines():
        if line.startswith("kimi_k2_requests_total{") and 'status="5' in line:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def engine_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        vals = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith(("kimi_k2_engine_running", "kimi_k2_engine_waiting", "kimi_k2_engine_pages_used"))}
        if not any(vals.values()) or time.monotonic() > deadline:
            return {"metrics": text, **{k.removeprefix("kimi_k2_engine_"): v for k, v in vals.items()}}
        time.sleep(0.2)


def main() -> int:
    import psutil

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model dir (default: a random model of --preset built in a temp dir)")
    p.add_argument("--preset", default="k2-tiny")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--abusers", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per phase")
    p.add_argument("--rounds", type=int, default=2, help="quiet/abuse pairs, in ABBA order")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--huge-mb", type=float, default=25.0, help="size of the over-the-limit bodies")
    p.add_argument("--long-mb", type=float, default=4.0, help="size of the under-the-limit, too-long prompts")
    p.add_argument("--pace", type=float, default=0.5,
                   help="each abuser sends at most one request per this many seconds (0: back to back, a flood)")
    p.add_argument("--only", help="only the abuse kinds whose name contains this (e.g. 'huge', 'stop', 'abort')")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_model(Path(tmp) / "model", args.preset)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "KIMI_K2_API_KEY": KEY}
        cmd = [sys.executable, "-m", "kimi_k2.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--served-model-name", "bench", "--max-num-seqs", str(args.clients + args.abusers),
               "--log-level", "warning"]
        proc = subprocess.Popen(cmd, env=env)
        try:
            wait_until_healthy(url, proc, 180)
            server = psutil.Process(proc.pid)
            asyncio.run(good_clients(url, "bench", args.clients, args.max_tokens, 5.0))  # warm-up
            engine_idle(url)
            rss = [server.memory_info().rss]
            phases: dict[str, list] = {"quiet": [], "abuse": []}
            cpu = {"quiet": 0.0, "abuse": 0.0, "abusers": 0.0}
            abuse_results: list[dict] = []
            load = [os.getloadavg()[0]]
            for r in range(args.rounds):
                for phase in ("quiet", "abuse") if r % 2 == 0 else ("abuse", "quiet"):  # ABBA: load drift cancels
                    c0 = sum(server.cpu_times()[:2])
                    if phase == "quiet":
                        phases[phase].append(asyncio.run(good_clients(url, "bench", args.clients, args.max_tokens,
                                                                      args.duration)))
                    else:
                        ctx = multiprocessing.get_context("spawn")
                        parent, child = ctx.Pipe()
                        ab = ctx.Process(target=abusers_process, args=(
                            url, "bench", args.abusers, args.duration, int(args.huge_mb * 2**20),
                            int(args.long_mb * 2**20), args.only, args.pace, child))
                        ab.start()
                        phases[phase].append(asyncio.run(good_clients(url, "bench", args.clients, args.max_tokens,
                                                                      args.duration)))
                        results, abuser_cpu = parent.recv()
                        abuse_results += results
                        cpu["abusers"] += abuser_cpu
                        ab.join()
                    cpu[phase] += sum(server.cpu_times()[:2]) - c0
                    load.append(os.getloadavg()[0])
                    engine_idle(url)
                    rss.append((phase, server.memory_info().rss))
            idle = engine_idle(url)
        finally:
            proc.terminate()
            proc.wait(60)
    q, a = summarize(merge(phases["quiet"])), summarize(merge(phases["abuse"]))
    per_round = [round(percentile(ab["itl"], 99) / percentile(qu["itl"], 99), 3)
                 for qu, ab in zip(phases["quiet"], phases["abuse"], strict=True)]
    kinds = abuse_report(abuse_results)
    report = {
        "command": " ".join(sys.argv), "cpus": os.cpu_count(), "load_avg_1m": [round(x, 2) for x in load],
        "quiet": q, "abuse": a,
        "itl_p99_ratio": round(a["itl_p99_ms"] / q["itl_p99_ms"], 3),
        "itl_p99_ratio_per_round": per_round,
        "itl_p99_ratio_median_of_rounds": sorted(per_round)[len(per_round) // 2],
        "ttft_p99_ratio": round(a["ttft_p99_ms"] / q["ttft_p99_ms"], 3),
        "abusive_requests": len(abuse_results),
        "abusive_requests_per_s": round(len(abuse_results) / (args.rounds * args.duration), 1),
        "abusive_not_as_expected": sum(len(k["problems"]) for k in kinds.values()),
        "abuse_kinds": kinds, "server_5xx": server_5xx(idle["metrics"]),
        "engine_after": {k: idle[k] for k in ("running", "waiting", "pages_used") if k in idle},
        "cpu_s": {"server_quiet": round(cpu["quiet"], 1), "server_abuse": round(cpu["abuse"], 1),
                  "abusers_process": round(cpu["abusers"], 1)},
        "rss_mb": {"baseline": round(rss[0] / 2**20, 1),
                   "after_each_phase": [f"{phase} {x / 2**20:.1f}" for phase, x in rss[1:]],
                   "last_minus_first_phase": round((rss[-1][1] - rss[1][1]) / 2**20, 1)},
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = report["server_5xx"] == 0 and report["abusive_not_as_expected"] == 0 and not q["errors"] and not a["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
