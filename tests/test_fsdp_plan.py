"""`kimi-k2 plan --train`: the training-memory arithmetic against what a trainer's ranks hold, and the K2 layouts."""

import pytest
import torch

from kimi_k2.cli import main
from kimi_k2.config import K2Config
from kimi_k2.deploy.train_plan import make_train_plan, smallest_train_unit, state_bytes
from kimi_k2.model import K2ForCausalLM
from kimi_k2.train import MuonClip, param_groups
from kimi_k2.train.memory import measure

K2 = K2Config.from_preset("kimi-k2-instruct")


@pytest.mark.parametrize("preset", ["k2-tiny", "k2-small"])
def test_state_bytes_are_what_a_muonclip_step_allocates(preset):
    cfg = K2Config.from_preset(preset)
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(cfg, dtype=torch.float32)
    opt = MuonClip(param_groups(model, lr=1e-3), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    memory = measure(model, opt, [], ep=1, world=1)
    assert memory.total == memory.held == state_bytes(cfg)
    plan = make_train_plan(cfg, "H100", 8)
    assert [lay.sharded for lay in plan.layouts] == [state_bytes(cfg)] + [state_bytes(cfg) / 8] * (len(
        plan.layouts) - 1)


def test_k2_needs_128_h200s_and_enough_expert_parallelism():
    plan = smallest_train_unit(K2, "H200")
    assert plan is not None and plan.n_gpus == 128
    assert state_bytes(K2) / 1e12 == pytest.approx(12.33, abs=0.01)  # 1.03 T parameters x ~12 B
    fits = {lay.ep for lay in plan.layouts if lay.fits}
    assert fits == {32, 64, 128}  # with fewer expert-parallel ranks one layer's experts do not fit gathered
    assert plan.best.ep == 64
    assert not make_train_plan(K2, "H200", 120).fits


def test_cli_prints_the_layouts_and_the_recipe_line(capsys):
    assert main(["plan", "--train", "--gpus", "128xH200"]) == 0
    out = capsys.readouterr().out
    assert "FSDP2 dp_shard=128 ep=64" in out and "[parallel] dp_shard = 128, ep = 64" in out
    assert main(["plan", "--train", "--gpus", "64xH200"]) == 1
    assert "no FSDP2 layout of 64 x H200" in capsys.readouterr().out
    assert main(["plan", "--train", "--smallest", "--gpus", "8xH100", "--reserve-gib", "16"]) == 0
    assert capsys.readouterr().out.startswith("smallest unit: ")
