"""FSDP2 (+ expert parallel) training through the real CLI under `torchrun` (gloo, CPU) against one process, and
resuming its sharded checkpoints on the same and on other world sizes.

The default run trains on 2 ranks (FSDP2 with the experts split 2 ways); the 4-rank layouts (experts sharded over a
2-D mesh) run with --run-slow. FSDP2 + EP on 4 ranks in the default run: tests/test_fsdp.py.

Every run has the same global batch (8 rows: micro_batch x grad_accum x ranks) and checkpoints at step 3 of 6.
Bounds: across layouts the reductions sum in other orders, so losses agree to rel 1e-4 and weights to 1e-3 (the
existing DDP bound); a resume on the same layout reproduces the run bit for bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_trainer import TINY, make_tokens, read_log

STEPS, CKPT = 6, 3
LAYOUTS = {  # name -> (ranks, grad_accum, extra overrides)
    "one": (1, 4, []),
    "fsdp2": (2, 2, ["--set", "parallel.dp_shard=2"]),
    "fsdp2_ep2": (2, 2, ["--set", "parallel.dp_shard=2", "--set", "parallel.ep=2"]),
    "fsdp4_ep2": (4, 1, ["--set", "parallel.dp_shard=4", "--set", "parallel.ep=2"]),
    "fsdp4_ep4": (4, 1, ["--set", "parallel.dp_shard=-1", "--set", "parallel.ep=4"]),
}


def command(out: Path, tokens: Path, layout: str) -> list[str]:
    nproc, accum, extra = LAYOUTS[layout]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "kimi_k2.cli", "train", "--config", str(TINY),
            "--out", str(out), "--set", f"data.paths=[{json.dumps(str(tokens))}]", "--set", "train.micro_batch=2",
            "--set", f"train.grad_accum={accum}", "--set", f"schedule.total_steps={STEPS}",
            "--set", f"train.ckpt_every={CKPT}", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(out: Path, tokens: Path, layout: str) -> list[dict]:
    proc = subprocess.run(command(out, tokens, layout), capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_log(out)


def losses(log: list[dict]) -> list[tuple[int, str, float]]:
    return [(r["step"], k, r[k]) for r in log for k in ("loss", "val_loss", "grad_norm") if k in r]


def assert_close_runs(got: list[dict], want: list[dict], rel: float = 1e-4) -> None:
    a, b = losses(got), losses(want)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for x, y in zip(a, b, strict=True):
        assert x[2] == pytest.approx(y[2], rel=rel), (x, y)
    # the aux-loss-free router bias saw the same load, summed over all ranks' tokens: the same balance every step
    vio = [(r["step"], r["expert_maxvio"]) for r in got if "expert_maxvio" in r]
    assert vio == [(r["step"], r["expert_maxvio"]) for r in want if "expert_maxvio" in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


def resume_from_step(src: Path, dst: Path) -> Path:
    """A copy of run `src` as it was when its step-3 checkpoint was the newest (later ones and the export gone)."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > CKPT:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "final")
    return dst


class Runs:
    """The 6-step run of each layout, trained once per module when a test first asks for it."""

    def __init__(self, tmp: Path):
        self.tmp, self.tokens, self.done = tmp, make_tokens(tmp / "tokens.npy"), {}

    def __getitem__(self, layout: str) -> Path:
        if layout not in self.done:
            train(self.tmp / layout, self.tokens, layout)
            self.done[layout] = self.tmp / layout
        return self.done[layout]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("fsdp"))


FSDP_EP = [pytest.param("fsdp2_ep2", id="2ranks"), pytest.param("fsdp4_ep2", id="4ranks", marks=pytest.mark.slow)]


@pytest.mark.parametrize("layout", FSDP_EP)
def test_fsdp2_with_expert_parallel_matches_one_process(runs, layout):
    nproc, _, _ = LAYOUTS[layout]
    log = read_log(runs[layout])
    assert_close_runs(log, read_log(runs["one"]))
    assert log[0]["layout"] == {"layout": "fsdp2", "dp_shard": nproc, "ep": 2, "param_dtype": "float32"}
    memory = log[0]["memory"]  # every rank holds 1/N of parameters + gradients + optimizer state
    assert len(memory) == nproc and all(m["held"] <= 1.1 * m["total"] / nproc for m in memory)
    assert all(m["held"] + m["ns_gathered"] <= 1.1 * m["sharded_target"] for m in memory)
    one, sharded = weights(runs["one"]), weights(runs[layout])
    assert one.keys() == sharded.keys()
    for name in one:
        torch.testing.assert_close(sharded[name], one[name], rtol=1e-3, atol=1e-5)
    ckpt = runs[layout] / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in ckpt.iterdir()) == [".metadata"] + [f"__{r}_0.distcp" for r in range(nproc)] + [
        "state.pt"]


# a sharded resume in the default run: test_resume_across_world_sizes_and_expert_layouts[fsdp2_ep2-one] (the 2-rank
# FSDP2+EP checkpoint continued by one process, losses to rel 1e-4); bitwise resume: test_train_trainer's sigkill test
@pytest.mark.slow
@pytest.mark.parametrize("layout", FSDP_EP)
def test_resume_on_the_same_layout_is_bitwise(runs, layout):
    out = resume_from_step(runs[layout], runs.tmp / f"again_{layout}")
    log = train(out, runs.tokens, layout)
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]
    assert strip == [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in read_log(runs[layout])]
    want = weights(runs[layout])
    assert all(torch.equal(t, want[n]) for n, t in weights(out).items())


def test_a_resume_with_another_global_batch_is_refused(runs, tmp_path):
    out = resume_from_step(runs["fsdp2_ep2"], tmp_path / "other_batch")
    cmd = command(out, runs.tokens, "one")
    cmd[cmd.index("train.grad_accum=4")] = "train.grad_accum=2"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 1 and "global batch of 8 rows; this run's is 4" in proc.stderr


@pytest.mark.parametrize("src, dst", [("fsdp2_ep2", "one"), *(pytest.param(*p, marks=pytest.mark.slow) for p in [
    ("fsdp4_ep2", "fsdp2"), ("fsdp4_ep2", "one"), ("one", "fsdp4_ep4"), ("fsdp4_ep2", "fsdp4_ep4")])])
def test_resume_across_world_sizes_and_expert_layouts(runs, src, dst):
    out = resume_from_step(runs[src], runs.tmp / f"{src}_to_{dst}")
    log = train(out, runs.tokens, dst)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, STEPS + 1))
    assert_close_runs(log, read_log(runs[src]))


@pytest.mark.slow
def test_fsdp2_on_two_ranks_matches_one_process(runs):
    assert_close_runs(read_log(runs["fsdp2"]), read_log(runs["one"]))


@pytest.mark.slow
def test_sigkill_of_every_rank_mid_run_then_resume_is_bitwise(runs):
    """Kill all four ranks at once while they write a checkpoint or train past it; the rerun must not pick up a half
    checkpoint and must redo the lost steps exactly."""
    out = runs.tmp / "killed"
    proc = subprocess.Popen(command(out, runs.tokens, "fsdp4_ep2"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if list((out / "checkpoints").glob(".tmp_step_*")) if (out / "checkpoints").exists() else []:
            break
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    train(out, runs.tokens, "fsdp4_ep2")
    want = weights(runs["fsdp4_ep2"])
    assert all(torch.equal(t, want[n]) for n, t in weights(out).items())


@pytest.mark.slow
def test_fine_tuning_from_an_export_loads_shards_and_matches_one_process(runs):
    init = ["--set", f"model.init_from={json.dumps(str(runs['one'] / 'final'))}", "--set", "schedule.warmup_steps=0"]
    logs = []
    for layout in ("one", "fsdp4_ep2"):
        out = runs.tmp / f"finetune_{layout}"
        cmd = command(out, runs.tokens, layout) + init
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        logs.append(read_log(out))
    assert_close_runs(logs[1], logs[0])
    assert logs[0][0]["loss"] < read_log(runs["one"])[0]["loss"] - 0.3  # it started from the trained weights
