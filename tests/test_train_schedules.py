import math

import pytest
import torch

from kimi_k2.train.schedules import Schedule, set_lr


def test_warmup_is_linear_to_peak():
    s = Schedule(kind="wsd", warmup_steps=4, total_steps=20, decay_fraction=0.25)
    assert [s(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_wsd_stable_then_cosine_to_min():
    s = Schedule(kind="wsd", warmup_steps=2, total_steps=20, decay_fraction=0.25, min_lr_ratio=0.1)
    assert all(s(i) == 1.0 for i in range(2, 15))  # decay starts at 20 - 5 = 15
    decay = [s(i) for i in range(15, 20)]
    assert decay[0] == 1.0 and decay[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    mid = s(15 + 2)  # halfway through the cosine: (1 + min) / 2
    assert mid == pytest.approx(0.55)


def test_cosine_decays_from_end_of_warmup():
    s = Schedule(kind="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.0)
    assert s(9) == 1.0 and s(10) == 1.0
    assert s(109) == pytest.approx(0.0)
    for i in range(10, 109):
        t = (i - 10) / 99
        assert s(i) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)))


@pytest.mark.parametrize(
    "kw, word",
    [({"kind": "linear"}, "kind"), ({"total_steps": 0}, "total_steps"), ({"warmup_steps": 5, "total_steps": 2},
     "warmup_steps"), ({"decay_fraction": 1.5}, "decay_fraction"), ({"min_lr_ratio": -1}, "min_lr_ratio")],
)
def test_bad_schedule_names_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        Schedule(**kw)


def test_set_lr_scales_each_group_from_its_own_peak():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    s = Schedule(kind="wsd", warmup_steps=2, total_steps=10)
    assert set_lr(opt, s, 0) == 0.5
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05)
    set_lr(opt, s, 5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])
