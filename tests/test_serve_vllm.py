"""`kimi-k2 serve` as a drop-in for `vllm serve`: the Kimi-K2 deploy guide's command lines parse (every flag either
read or accepted with a logged note), and the guide's command, with a Hugging Face repo id as MODEL resolved from a
Hub cache offline, serves a K2-Thinking-layout checkpoint with reasoning and tool calls."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
from server_fixtures import free_port, wait_until_healthy
from test_hub import write_cache
from thinking_fixtures import LOOKUP_SCRIPT, LOOKUP_TOOLS, make_scripted_thinking_dir

from kimi_k2.cli import main, parse
from kimi_k2.cli.serve import chat_template, vllm_notes

# the Kimi-K2 deploy guidance (MoonshotAI/Kimi-K2 docs/deploy_guidance.md), `vllm serve` replaced by `kimi-k2 serve`
GUIDE_TP = ("serve $MODEL_PATH --port 8000 --served-model-name kimi-k2 --trust-remote-code --tensor-parallel-size 16 "
            "--enable-auto-tool-choice --tool-call-parser kimi_k2")
GUIDE_DP_EP = ("serve $MODEL_PATH --port 8000 --served-model-name kimi-k2 --trust-remote-code --data-parallel-size 16 "
               "--data-parallel-size-local 8 --data-parallel-address 10.0.0.1 --data-parallel-rpc-port 13345 "
               "--enable-expert-parallel --max-num-batched-tokens 8192 --max-num-seqs 256 "
               "--gpu-memory-utilization 0.85 --enable-auto-tool-choice --tool-call-parser kimi_k2")
REPO = "moonshotai/Kimi-K2-Thinking"
KEY = "vllm-key"


def argv(command: str, model: str = "moonshotai/Kimi-K2-Instruct") -> list[str]:
    return shlex.split(command.replace("$MODEL_PATH", model))


def test_guide_commands_parse_with_notes():
    _, tp = parse(argv(GUIDE_TP))
    assert (tp.model, tp.port, tp.served_model_name, tp.tool_call_parser) == \
        ("moonshotai/Kimi-K2-Instruct", 8000, ["kimi-k2"], "kimi_k2")
    notes = " ".join(vllm_notes(tp))
    assert "--trust-remote-code" in notes and "--tensor-parallel-size" not in notes  # tensor parallel is real here
    _, dp = parse(argv(GUIDE_DP_EP))
    assert (dp.max_num_batched_tokens, dp.max_num_seqs, dp.gpu_memory_utilization) == (8192, 256, 0.85)
    notes = " ".join(vllm_notes(dp))
    assert "--data-parallel-size 16" in notes and "--enable-expert-parallel" in notes and "0.85" in notes
    _, args = parse(["serve", "--model", "m", "--reasoning-parser", "kimi_k2", "--max-model-len", "128k",
                     "--dtype", "auto", "--uvicorn-log-level", "debug", "--chat-template", "kimi_k2_thinking"])
    assert (args.model, args.reasoning_parser, args.max_model_len, args.dtype) == ("m", "kimi_k2", 131072, "auto")
    assert "<think>" in chat_template(args.chat_template)


@pytest.mark.parametrize("extra,message", [
    (["--tool-call-parser", "hermes"], "invalid choice"),
    (["--max-model-len", "12q"], "token count"),
    (["--headless"], "--headless"),
    (["--gpu-memory-utilization", "1.5"], "must be in (0, 1]"),
    (["--chat-template", "no-such-template"], "neither a file"),
    (["--enforce-eager", "--compile"], "contradict"),
    (["--tensor-parallel-size", "2", "--ep", "2"], "goes without --ep"),
])
def test_bad_vllm_flags_are_usage_errors(extra, message, capsys, tmp_path):
    assert main(["serve", str(tmp_path / "missing"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_tensor_parallel_outside_torchrun_names_the_launch(capsys, monkeypatch):
    model_dir = Path(__file__).resolve().parents[1] / "models" / "k2-nano-instruct"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["serve", str(model_dir), "--tensor-parallel-size", "16", "--device", "cpu"]) == 1
    assert "torchrun --nproc-per-node 16 -m kimi_k2.cli serve DIR --tensor-parallel-size 16" in capsys.readouterr().err


def test_guide_command_serves_a_hub_repo_offline(k2_tokenizer_dir: Path, tmp_path: Path):
    """The guide's command (one process: --tensor-parallel-size 1) plus --reasoning-parser kimi_k2, MODEL a repo id
    resolved from the Hub cache with HF_HUB_OFFLINE=1."""
    model_dir = make_scripted_thinking_dir(k2_tokenizer_dir, tmp_path / "model", LOOKUP_SCRIPT)
    cache = tmp_path / "hf" / "hub"
    write_cache(cache, REPO, "c" * 40, {p.name: p.read_bytes() for p in model_dir.iterdir()})
    port = free_port()
    command = argv(GUIDE_TP.replace("--tensor-parallel-size 16", "--tensor-parallel-size 1"), REPO)
    command[command.index("--port") + 1] = str(port)
    command += ["--reasoning-parser", "kimi_k2", "--api-key", KEY, "--max-model-len", "1k", "--dtype", "auto",
                "--enforce-eager",  # vLLM: no CUDA graphs; here: no compiled decode (and no compile time)
                "--uvicorn-log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "kimi_k2.cli", *command], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        card = client.models.retrieve("kimi-k2")
        assert card.id == "kimi-k2" and card.max_model_len == 1024
        r = client.chat.completions.create(model="kimi-k2", messages=[{"role": "user", "content": "hi"}],
                                           tools=LOOKUP_TOOLS, temperature=0)
        msg = r.choices[0].message
        assert msg.reasoning_content == "hmm" and msg.tool_calls[0].id == "functions.lookup:0"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0].decode()
        print(out)
    assert "--trust-remote-code: accepted" in out and "Traceback" not in out
