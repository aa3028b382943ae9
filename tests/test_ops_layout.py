"""Zero-copy inference layouts (`kimi_k2.ops.layout`): the modules keep their values, names and results, their
weights become views of one tensor, and that tensor is what a fast path reads (in-place updates included)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_tiny_model
from torch import nn

from kimi_k2.model.decode import prepare_decode_layout
from kimi_k2.ops.layout import fuse_columns, fused_view, pack_rows, packed_view


def _linears(*outs: int, dim: int = 12) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(dim, n, bias=False) for n in outs]


def test_fuse_columns_keeps_values_and_shares_memory() -> None:
    a, b = _linears(5, 7)
    x = torch.randn(3, 12)
    before = [m(x).detach() for m in (a, b)]
    weights = [m.weight.detach().clone() for m in (a, b)]
    wt = fuse_columns([a, b])
    assert wt.shape == (12, 12) and wt.is_contiguous()
    assert [torch.equal(m.weight, w) for m, w in zip((a, b), weights, strict=True)] == [True, True]
    torch.testing.assert_close(x @ wt, torch.cat(before, dim=1))
    assert fuse_columns([a, b]).data_ptr() == wt.data_ptr()  # already fused: no second copy
    with torch.no_grad():
        b.weight.mul_(2)
    torch.testing.assert_close(fused_view([a.weight, b.weight])[:, 5:], 2 * weights[1].t())
    assert fused_view([b.weight, a.weight]) is None  # not in that order
    assert fused_view([nn.Linear(12, 5).weight, nn.Linear(12, 7).weight]) is None


def test_pack_rows_makes_row_views() -> None:
    """Groups of modules (an expert's gate and up) packed as [G, rows, K]: each weight a view of its rows, values
    kept; a second call returns the same tensor; groups of unequal rows are refused."""
    experts = [_linears(4, 3) for _ in range(3)]
    weights = [[m.weight.detach().clone() for m in e] for e in experts]
    pack = pack_rows(experts, "weight")
    assert pack.shape == (3, 7, 12) and all(isinstance(m.weight, nn.Parameter) for e in experts for m in e)
    assert all(torch.equal(pack[g], torch.cat(w)) for g, w in enumerate(weights))
    assert pack_rows(experts, "weight").data_ptr() == pack.data_ptr()
    with torch.no_grad():
        experts[2][1].weight.mul_(3)
    torch.testing.assert_close(pack[2, 4:], 3 * weights[2][1])
    assert packed_view(experts[::-1], "weight") is None
    with pytest.raises(ValueError, match="groups of equal rows"):
        pack_rows([_linears(4), _linears(5)], "weight")


def test_decode_layout_leaves_the_model_unchanged() -> None:
    model = random_tiny_model()
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(ids)
        prepare_decode_layout(model)
        after = model(ids)
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    attn = model.model.layers[0].self_attn
    assert fused_view([attn.q_a_proj.weight, attn.kv_a_proj_with_mqa.weight]) is not None
