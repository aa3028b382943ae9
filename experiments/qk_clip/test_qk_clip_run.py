"""experiments/qk_clip/run.py end to end (opt-in: --run-experiments): a smoke run, and the experiment's claim with
--run-slow too."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent / "run.py"


def _run(out: Path, *argv: str) -> dict:
    subprocess.run([sys.executable, str(RUN), "--out", str(out), "--threads", "1", *argv], check=True,
                   capture_output=True, timeout=900)
    assert (out / "max_logits_and_loss.png").stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def test_smoke(tmp_path):
    res = _run(tmp_path, "--steps", "16", "--n", "6", "--batch", "4", "--eval-every", "8", "--tau", "0.08",
               "--warmup", "1")
    free, clipped = res["runs"]["Muon (no clip)"], res["runs"]["MuonClip (tau=0.08)"]
    assert len(free["loss"]) == len(clipped["loss"]) == 16 and free["val_step"] == [8, 16]
    assert free["loss"][0] == clipped["loss"][0]  # same init and batch; the clip only acts after the first step
    assert sum(free["heads_clipped"]) == 0
    first = next(t for t, h in enumerate(clipped["heads_clipped"]) if h > 0)
    assert clipped["max_logit"][first] > 0.08
    assert clipped["loss"][: first + 1] == free["loss"][: first + 1]  # identical until the first clip acts
    assert clipped["loss"][first + 1] != free["loss"][first + 1]


@pytest.mark.slow
def test_logits_grow_without_clip_and_stay_near_tau_with_it(tmp_path):
    res = _run(tmp_path, "--steps", "200")
    free, clipped = res["summary"]["Muon (no clip)"], res["summary"]["MuonClip (tau=30)"]
    assert free["peak_max_logit"] > 100
    assert clipped["peak_max_logit"] < 1.25 * 30 and clipped["peak_max_logit_after_clip"] < 1.25 * 30
    assert clipped["final_val_loss"] < 0.1 and free["final_val_loss"] < 0.1
