import os
import pickle
import random

import numpy as np
import pytest
import torch

from kimi_k2.train import checkpointing as ck


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(model, opt, steps):
    for _ in range(steps):
        x = torch.randn(5, 4)  # draws from the global RNG, which the checkpoint restores
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_resume_continues_bitwise(tmp_path):
    model, opt = make()
    train(model, opt, 3)
    ck.save_checkpoint(tmp_path, 3, model, opt, {"tokens_seen": 15}, keep_last=2)
    train(model, opt, 4)
    ref = [p.detach().clone() for p in model.parameters()]

    model2, opt2 = make()
    state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), model2, opt2)
    assert state["step"] == 3 and state["tokens_seen"] == 15
    train(model2, opt2, 4)
    for a, b in zip(ref, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_streams_are_restored(tmp_path):
    model, opt = make()
    ck.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    expect = (torch.rand(3), random.random(), np.random.rand())
    ck.load_checkpoint(tmp_path / "checkpoints" / "step_00000001", model, opt)
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expect[0], got[0]) and expect[1:] == got[1:]


def test_keep_last_prunes_and_latest_ignores_temp_dirs(tmp_path):
    model, opt = make()
    for step in (2, 4, 6, 8):
        ck.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [6, 8]
    (tmp_path / "checkpoints" / ".tmp_step_00000010_1").mkdir()  # what a kill mid-save leaves behind
    assert ck.latest_checkpoint(tmp_path).name == "step_00000008"


def test_failure_mid_save_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    model, opt = make()
    ck.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=3)
    real_write = ck.write_files

    def failing_write(folder, files):  # the sharded tensors are written, then the disk fills up
        assert any(f.suffix == ".distcp" for f in folder.iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_files", failing_write)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=3)
    monkeypatch.setattr(ck, "write_files", real_write)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert sorted(os.listdir(tmp_path / "checkpoints" / "step_00000001")) == [".metadata", "__0_0.distcp", "state.pt"]
    ck.remove_interrupted(tmp_path)  # what the next run does first
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000001"]


def test_incomplete_checkpoint_dir_is_an_error(tmp_path):
    (tmp_path / "step").mkdir()
    model, opt = make()
    with pytest.raises(FileNotFoundError, match=r"incomplete: it needs .metadata and state.pt"):
        ck.load_checkpoint(tmp_path / "step", model, opt)
    (tmp_path / "step" / "model.pt").touch()
    with pytest.raises(FileNotFoundError, match="earlier kimi-k2"):
        ck.load_checkpoint(tmp_path / "step", model, opt)


def test_a_checkpoint_of_another_model_names_the_missing_tensors(tmp_path):
    model, opt = make()
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"lacks 2 tensors of this model, e.g. \['model/2.weight'"):
        ck.load_checkpoint(path, other)


def test_resaving_a_step_replaces_it(tmp_path):
    model, opt = make()
    ck.save_checkpoint(tmp_path, 2, model, opt, {"tokens_seen": 1}, keep_last=2)
    ck.save_checkpoint(tmp_path, 2, model, opt, {"tokens_seen": 2}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path), model, opt)["tokens_seen"] == 2


def test_state_pt_holds_only_tensors_and_plain_values(tmp_path):
    model, opt = make()
    ck.save_checkpoint(tmp_path, 1, model, opt, {"tokens_seen": 7}, keep_last=1)
    state = torch.load(tmp_path / "checkpoints" / "step_00000001" / "state.pt", weights_only=True)
    assert state["step"] == 1 and state["tokens_seen"] == 7 and isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)


class RunsCode:
    """What a crafted pickle can do on load: call any function (here: create a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_state_pt_with_other_objects_is_refused_unopened(tmp_path):
    model, opt = make()
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    state = torch.load(path / "state.pt", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": RunsCode(marker)}, path / "state.pt")
    with pytest.raises(ValueError, match="state.pt holds objects other than tensors and plain values"):
        ck.load_checkpoint(path, model, opt)
    assert not marker.exists()


def test_remove_interrupted_drops_temp_folders_and_puts_a_moved_checkpoint_back(tmp_path):
    model, opt = make()
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=3)
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".tmp_step_00000003").mkdir()  # killed while writing step 3
    os.rename(ckpts / "step_00000002", ckpts / ".old_step_00000002")  # killed while re-saving step 2
    (ckpts / "step_00000001").rename(ckpts / "keep")
    ck.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=3)
    (ckpts / "keep").rename(ckpts / ".old_step_00000001")  # ... and a re-save of step 1 that did finish
    ck.remove_interrupted(tmp_path)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2]


def test_a_crafted_metadata_pickle_is_refused_unopened(tmp_path):
    model, opt = make()
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    marker = tmp_path / "code-ran"
    with open(path / ".metadata", "wb") as f:
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(ValueError, match="holds objects other than DCP metadata"):
        ck.load_checkpoint(path, model, opt)
    assert not marker.exists()


def test_read_model_state_gives_the_full_tensors(tmp_path):
    model, opt = make()
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {}, keep_last=1)
    got = ck.read_model_state(path)
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
