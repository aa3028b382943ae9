"""Data and expert parallel training with a real `torchrun --nproc-per-node 2` (gloo, CPU) against one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from test_train_trainer import TINY, make_tokens, read_log

STEPS = 6


def train(out: Path, tokens: Path, nproc: int, grad_accum: int, *extra: str) -> list[dict]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    args = [*(launcher if nproc > 1 else [sys.executable]), "-m", "kimi_k2.cli", "train", "--config", str(TINY),
            "--out", str(out), "--set", f"data.paths=[{json.dumps(str(tokens))}]",
            "--set", f"train.grad_accum={grad_accum}", "--set", "train.micro_batch=4",
            "--set", f"schedule.total_steps={STEPS}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_log(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    tokens = make_tokens(tmp / "tokens.npy")
    train(tmp / "one", tokens, nproc=1, grad_accum=2)
    return tokens, tmp / "one"


# expert_parallel is DDP replicas with the routed experts split over the ranks: the data-parallel path (gradient
# all-reduce, the global batch, the router bias load) plus the all-to-alls; plain DDP with --run-slow
@pytest.mark.parametrize("mode", [pytest.param("data_parallel", marks=pytest.mark.slow), "expert_parallel"])
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, single, mode):
    tokens, one_dir = single
    extra = ["--set", "train.expert_parallel=true"] if mode == "expert_parallel" else []
    one, two = read_log(one_dir), train(tmp_path / "two", tokens, 2, 1, *extra)
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "grad_norm", "val_loss", "tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
        if "expert_maxvio" in a:  # the router bias update saw the same all-reduced load
            assert b["expert_maxvio"] == a["expert_maxvio"]
    if mode == "expert_parallel":  # each rank wrote the routed experts it holds, half of them
        ckpt = tmp_path / "two" / "checkpoints" / f"step_{STEPS:08d}"
        metadata = dcp.FileSystemReader(ckpt).read_metadata()
        experts = [{k.fqn.split(".")[5] for k, info in metadata.storage_data.items() if ".experts." in k.fqn
                    and info.relative_path.startswith(f"__{r}_")} for r in range(2)]
        assert experts == [{"0", "1", "2", "3"}, {"4", "5", "6", "7"}]
    # the HF-layout exports hold the same (full) model
    w1 = load_file(one_dir / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-3, atol=1e-5)
