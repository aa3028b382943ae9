"""`kimi-k2 chat`: an interactive terminal chat against a running server (--url) or a model directory (--model,
served in-process on a free loopback port). Replies stream; /reset clears the history, /exit (or EOF) quits."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="base URL of a kimi-k2 (or any OpenAI-compatible) server, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="model directory to serve in-process (default: models/k2-nano-instruct)")
    p.add_argument("--api-key", default=os.environ.get("KIMI_K2_API_KEY") or "EMPTY")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--system", default=SYSTEM)


def start_local(model: str) -> tuple[str, object] | None:
    import uvicorn

    from kimi_k2.cli.serve import check_model_dir
    from kimi_k2.engine import AsyncLLMEngine, LLMEngine
    from kimi_k2.server.app import build_app
    from kimi_k2.server.state import ServerState

    d = check_model_dir(model)
    if d is None:
        return None
    engine = LLMEngine.from_pretrained(d)
    state = ServerState(AsyncLLMEngine(engine), engine.tokenizer, [d.resolve().name], engine.model_config.vocab_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI, OpenAIError

    server = None
    url = args.url
    if url is None:
        local = start_local(args.model or "models/k2-nano-instruct")
        if local is None:
            return 2
        url, server = local
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.api_key)
    try:
        model = client.models.list().data[0].id
    except OpenAIError as e:
        print(f"kimi-k2 chat: cannot reach {url}: {e}", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}]
    print(f"chatting with {model} at {url}; /reset clears the history, /exit quits")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = messages[:1]
            continue
        messages.append({"role": "user", "content": line})
        reply = ""
        try:
            for chunk in client.chat.completions.create(model=model, messages=messages, stream=True,
                                                        temperature=args.temperature, max_tokens=args.max_tokens):
                if chunk.choices and chunk.choices[0].delta.content:
                    reply += chunk.choices[0].delta.content
                    print(chunk.choices[0].delta.content, end="", flush=True)
        except OpenAIError as e:
            print(f"\n[error: {e}]", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": reply})
    if server is not None:
        server.should_exit = True
    return 0
