"""`kimi-k2 serve --ep 2` and `--tensor-parallel-size 2 --enable-expert-parallel` under a real torchrun (gloo, CPU):
rank 0 serves HTTP, rank 1 holds half the experts (and, with tensor parallel, half the heads, MLP columns and
vocabulary); the official `openai` client gets the same greedy text as from the single-process server; SIGTERM to
rank 0 ends all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import openai
import psutil
import pytest
from server_fixtures import API_KEY, MODEL, ServerThread, free_port, make_model_dir, make_state, wait_until_healthy

from kimi_k2.cli import main

CHATS = [
    [{"role": "user", "content": "What's the weather like in Beijing today?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three rivers, please."}],
]
MAX_TOKENS = 20


def complete(client: openai.OpenAI, messages: list[dict], stream: bool) -> str:
    kw = dict(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True)
                       if c.choices)
    return client.chat.completions.create(**kw).choices[0].message.content


def answers(url: str) -> list[str]:
    """Greedy replies: each chat non-streamed and streamed, then the last one as n=3 samples decoded side by side
    (several decode rows per step, so rank 1 computes some rows from its own copy of the page pool)."""
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    out = [complete(client, m, stream) for m in CHATS for stream in (False, True)]
    r = client.chat.completions.create(model=MODEL, messages=CHATS[-1], temperature=0, max_tokens=MAX_TOKENS, n=3)
    return out + [c.message.content for c in r.choices]


@pytest.fixture(scope="module")
def model_dir(k2_tokenizer_dir, tmp_path_factory):
    return make_model_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("model"))  # k2-tiny: 8 routed experts


@pytest.fixture(scope="module")
def reference(model_dir):
    with ServerThread(make_state(model_dir, default_max_tokens=None)) as url:
        return answers(url)


def test_ep_without_torchrun_or_with_the_wrong_world_says_how_to_launch(model_dir, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    for command in ("serve", "generate"):
        prompt = ["--prompt", "hi"] if command == "generate" else []
        assert main([command, str(model_dir), "--ep", "2", *prompt]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"kimi-k2 {command}: error:") and "WORLD_SIZE" in err
        assert f"torchrun --nproc-per-node 2 -m kimi_k2.cli {command} DIR --ep 2" in err
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert main(["serve", str(model_dir), "--ep", "2"]) == 1
    assert "WORLD_SIZE=4" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--ep", "0"]) == 2  # a usage error
    assert "argument --ep: must be >= 1, got 0" in capsys.readouterr().err


# --ep over torchrun in the default run: test_deploy_expert_parallel's `generate --ep 2`
@pytest.mark.parametrize("layout", [pytest.param(["--ep", "2"], marks=pytest.mark.slow),
                                    ["--tensor-parallel-size", "2", "--enable-expert-parallel"]], ids=["ep2", "tp2-ep"])
def test_serve_over_two_ranks_matches_one_process_and_stops_on_sigterm_to_rank0(model_dir, reference, tmp_path,
                                                                               layout):
    port = free_port()
    assert all(reference)  # the comparison below is not between empty strings
    log = open(tmp_path / "torchrun.log", "w+")  # read back once the processes have ended
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "kimi_k2.cli",
         "serve", str(model_dir), *layout, "--port", str(port), "--api-key", API_KEY,
         "--served-model-name", MODEL, "--dtype", "float32", "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    ranks: list[psutil.Process] = []
    try:
        wait_until_healthy(url, proc)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        by_rank = {p.environ().get("RANK"): p for p in ranks}
        assert set(by_rank) == {"0", "1"}
        assert answers(url) == reference
        by_rank["0"].send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(ranks, timeout=10)
        assert not alive
    finally:
        for p in ranks:
            if p.is_running():
                p.kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        log.seek(0)
        out = log.read()
        log.close()
        print(out)  # shown by pytest if anything above failed
    assert "Traceback" not in out and "error" not in out.lower(), out
