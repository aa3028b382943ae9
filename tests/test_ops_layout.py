"""Zero-copy inference layouts (`kimi_k2.ops.layout`): the modules keep their values, names and results, their
weights become views of one tensor, and that tensor is what a fast path reads (in-place updates included)."""

from __future__ import annotations

import torch
from model_fixtures import random_tiny_model
from torch import nn

from kimi_k2.model.decode import prepare_decode_layout
from kimi_k2.ops.layout import fuse_columns, fused_view, stack_parameters, stacked_view


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


def test_stack_parameters_makes_row_views() -> None:
    experts = _linears(4, 4, 4)
    weights = [m.weight.detach().clone() for m in experts]
    stack = stack_parameters(experts, "weight")
    assert stack.shape == (3, 4, 12) and all(isinstance(m.weight, nn.Parameter) for m in experts)
    assert all(torch.equal(stack[i], w) for i, w in enumerate(weights))
    assert stacked_view([m.weight.detach() for m in experts]).data_ptr() == stack.data_ptr()
    assert stacked_view([experts[1].weight.detach(), experts[0].weight.detach()]) is None


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
