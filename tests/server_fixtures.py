"""Helpers for the server tests: a random k2-tiny model directory with a real trained tokenizer, and a real uvicorn
server on a free loopback port in a background thread."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from kimi_k2.config import K2Config
from kimi_k2.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from kimi_k2.model import K2ForCausalLM
from kimi_k2.server.app import build_app
from kimi_k2.server.state import ServerLimits, ServerState
from kimi_k2.tokenizer import Tokenizer

MODEL = "kimi-k2-test"
ALIASES = [MODEL, "moonshotai/Kimi-K2-Instruct"]
API_KEY = "test-key"


def make_model_dir(tokenizer_dir: Path, out: Path) -> Path:
    """k2-tiny with the tokenizer's vocabulary and BOS/EOS ids, random weights (seeded), plus the tokenizer files."""
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    config = K2Config.from_preset("k2-tiny")
    config.vocab_size, config.bos_token_id, config.eos_token_id = tok.n_vocab, tok.bos_id, tok.eos_id
    torch.manual_seed(0)
    K2ForCausalLM.from_config(config, torch.float32).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def make_state(model_dir: Path, api_key: str | None = API_KEY, default_max_tokens: int | None = 48,
               limits: ServerLimits | None = None, public_metrics: bool = False, reasoning: bool = False,
               **engine_kw) -> ServerState:
    model = K2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(model_dir)
    engine = LLMEngine(model, tok, EngineConfig(**{"memory_budget_bytes": 1 << 25, **engine_kw}))
    limits = limits or ServerLimits()
    return ServerState(AsyncLLMEngine(engine, limits.max_queued_requests), tok, ALIASES, model.config.vocab_size,
                       api_key, default_max_tokens, limits, public_metrics, reasoning)


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll `url`/health until it answers 200; AssertionError if `proc` ends or `timeout` seconds pass first. One
    client for all polls: a fresh one per poll (`httpx.get`) costs ~60 ms of CPU setting up TLS."""
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not come up"
            try:
                if client.get(url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`with ServerThread(state) as url:` serves build_app(state) on http://127.0.0.1:PORT until the block ends."""

    def __init__(self, state: ServerState, graceful_timeout: float = 10.0):
        self.state = state
        config = uvicorn.Config(build_app(state), host="127.0.0.1", port=free_port(), log_level="warning",
                                timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{config.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __exit__(self, *exc) -> None:
        self.stop()
