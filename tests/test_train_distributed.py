"""Data parallel training with a real `torchrun --nproc-per-node 2` (gloo, CPU) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_trainer import TINY, make_tokens, read_log


def train(out: Path, tokens: Path, nproc: int, grad_accum: int) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    args = [*(launcher if nproc > 1 else [sys.executable]), "-m", "kimi_k2.cli", "train", "--config", str(TINY),
            "--out", str(out), "--set", f"data.paths=[{json.dumps(str(tokens))}]",
            "--set", f"train.grad_accum={grad_accum}", "--set", "train.micro_batch=4",
            "--set", "schedule.total_steps=6"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_log(out)


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    tokens = make_tokens(tmp_path / "tokens.npy")
    one = train(tmp_path / "one", tokens, nproc=1, grad_accum=2)
    two = train(tmp_path / "two", tokens, nproc=2, grad_accum=1)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "val_loss", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
        if "expert_maxvio" in a:  # the router bias update saw the same all-reduced load
            assert b["expert_maxvio"] == a["expert_maxvio"]
    w1 = torch.load(tmp_path / "one/checkpoints/step_00000006/model.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two/checkpoints/step_00000006/model.pt", weights_only=True)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-5)
