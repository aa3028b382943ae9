"""`kimi-k2 chat [MODEL | --url URL]`: an interactive terminal chat against a running server (--url) or a model
directory (served in-process on a free loopback port). Replies stream; /reset clears the history, /exit (or EOF)
quits."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

from kimi_k2.cli.options import CommandError, UsageError, add_device, add_model, device, model_dir

SYSTEM = "You are Kimi, an AI assistant created by Moonshot AI."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p, "model directory to serve in-process (default without --url: models/k2-nano-instruct)",
              required=False)
    p.add_argument("--url", help="base URL of a kimi-k2 (or any OpenAI-compatible) server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("KIMI_K2_API_KEY") or "EMPTY")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--system", default=SYSTEM)
    add_device(p)


def start_local(model: str, device: object = "cpu") -> tuple[str, object]:
    """Serve the model directory `model` on `device` on a free loopback port -> (URL, the uvicorn server)."""
    import uvicorn

    from kimi_k2.engine import AsyncLLMEngine, LLMEngine
    from kimi_k2.server.app import build_app
    from kimi_k2.server.state import ServerState

    d = model_dir(model)
    engine = LLMEngine.from_pretrained(d, device=device)
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

    if args.url is not None and args.model is not None:
        raise UsageError("pass MODEL (served here) or --url URL (a running server), not both")
    where = device(args)
    server = None
    url = args.url
    if url is None:
        url, server = start_local(args.model or "models/k2-nano-instruct", where)
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key=args.api_key)
    try:
        model = client.models.list().data[0].id
    except OpenAIError as e:
        raise CommandError(f"cannot reach {url}: {e}") from None
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
