"""A model directory that cannot be served is named when it is loaded (`kimi-k2 serve` start-up, from_pretrained,
Tokenizer.from_pretrained), with the file and the reason, not later as a raw traceback or as a client's 400."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from server_fixtures import free_port, make_model_dir

from kimi_k2.checkpoint import CheckpointError
from kimi_k2.engine import LLMEngine
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer

BROKEN_TEMPLATE = "{% for m in messages %}{{ m.content }\n{% endfor %}"  # `}` where `}}` closes the expression


@pytest.fixture(scope="module")
def model_dir(k2_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(k2_tokenizer_dir, tmp_path_factory.mktemp("model") / "ok")


def copy_of(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def truncate(d: Path) -> Path:
    shard = d / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    return shard


def test_from_pretrained_names_a_truncated_shard(model_dir: Path, tmp_path: Path) -> None:
    d = copy_of(model_dir, tmp_path)
    shard = truncate(d)
    for load in (K2ForCausalLM.from_pretrained, LLMEngine.from_pretrained):
        with pytest.raises(CheckpointError, match=f"lies outside {shard}.*truncated"):
            load(d)


def test_a_chat_template_that_does_not_compile_is_named_at_load(model_dir: Path, tmp_path: Path) -> None:
    d = copy_of(model_dir, tmp_path)
    (d / "chat_template.jinja").write_text(BROKEN_TEMPLATE)
    with pytest.raises(ValueError, match=rf"{d / 'chat_template.jinja'}: chat template does not compile: "
                                         r"unexpected '}' \(line 1\)"):
        Tokenizer.from_pretrained(d)
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% if %}"}))
    with pytest.raises(ValueError, match=rf"{d / 'tokenizer_config.json'}: chat template does not compile"):
        Tokenizer.from_pretrained(d)


@pytest.mark.parametrize("defect", ["truncated shard", "broken chat template"])
def test_serve_stops_at_start_up_naming_the_file(model_dir: Path, tmp_path: Path, defect: str) -> None:
    d = copy_of(model_dir, tmp_path)
    if defect == "truncated shard":
        bad, reason = truncate(d), "truncated"
    else:
        bad, reason = d / "chat_template.jinja", "chat template does not compile: unexpected '}'"
        bad.write_text(BROKEN_TEMPLATE)
    cmd = [sys.executable, "-m", "kimi_k2.cli", "serve", "--model", str(d), "--port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "kimi-k2 serve: error:" in proc.stderr and str(bad) in proc.stderr and reason in proc.stderr
    assert "Traceback" not in proc.stderr and "Uvicorn running" not in proc.stderr
