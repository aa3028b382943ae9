"""MoE router and experts against direct per-token computations."""

from __future__ import annotations

import itertools

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.model.moe import Gate, MoE

GROUPED = {"hidden_size": 16, "n_routed_experts": 12, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
           "moe_intermediate_size": 8}


def _moe(**overrides) -> MoE:
    torch.manual_seed(0)
    moe = MoE(K2Config.from_preset("k2-tiny").replace(**overrides))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.5)
        moe.gate.e_score_correction_bias.uniform_(-0.6, 0.2)
    return moe


def _route_directly(gate: Gate, x: torch.Tensor) -> tuple[list[set[int]], torch.Tensor]:
    """Per token: keep the topk_group groups by sum of top-2 biased scores, then the top-k biased experts in them."""
    scores = torch.sigmoid(x.double() @ gate.weight.double().T)
    biased = scores + gate.e_score_correction_bias.double()
    size = gate.n_experts // gate.n_group
    chosen = []
    for row in biased:
        groups = sorted(range(gate.n_group), key=lambda g: -row[g * size:(g + 1) * size].topk(2).values.sum())
        allowed = [e for g in groups[: gate.topk_group] for e in range(g * size, (g + 1) * size)]
        chosen.append(set(sorted(allowed, key=lambda e: -row[e])[: gate.top_k]))
    return chosen, scores


def test_group_limited_routing_masks_dropped_groups_with_minus_inf() -> None:
    gate = _moe(**GROUPED).gate
    with torch.no_grad():
        gate.e_score_correction_bias.uniform_(-1.5, -0.5)  # biased scores < 0: the mask value decides
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    weights, indices, _ = gate(x)
    chosen, scores = _route_directly(gate, x)
    assert [set(r.tolist()) for r in indices] == chosen
    for t, row in enumerate(indices):
        w = scores[t, row]  # unbiased scores of the chosen experts, normalized, times the scaling factor
        torch.testing.assert_close(weights[t], (w / w.sum() * gate.routed_scaling_factor).float())
    # transformers 4.57 masks dropped groups with 0: with a negative bias it picks experts from dropped groups
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.DeepseekV3Config(**{**K2Config.from_preset("k2-tiny").replace(**GROUPED).to_dict(),
                                              "model_type": "deepseek_v3"})
    hf = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(hf_cfg)
    hf.load_state_dict(gate.state_dict())
    hf_chosen = [set(r.tolist()) for r in hf(x)[0]]
    assert hf_chosen != chosen


def test_moe_output_equals_per_token_sum() -> None:
    moe = _moe(**GROUPED).eval()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = moe(x)
        weights, indices, _ = moe.gate(x.view(-1, 16))
        expected = torch.stack([
            sum(w * moe.experts[int(e)](t) for w, e in zip(weights[i], indices[i], strict=True))
            for i, t in enumerate(x.view(-1, 16))
        ]).view_as(x) + moe.shared_experts(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert moe.last_expert_load.tolist() == torch.bincount(indices.flatten(), minlength=12).tolist()
    assert int(moe.last_expert_load.sum()) == 14 * 3
    assert moe.aux_loss is None  # eval mode


def test_sequence_balance_loss_matches_formula_and_has_gradient() -> None:
    moe = _moe(**GROUPED, aux_loss_alpha=0.01).train()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    moe(x)
    with torch.no_grad():
        _, indices, scores = moe.gate(x.view(-1, 16))
    E, k, T = 12, 3, 5
    expected = 0.0
    for b in range(3):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            f = E / (k * T) * sum(int(i in indices[r].tolist()) for r in rows)
            p = sum(float(scores[r, i] / scores[r].sum()) for r in rows) / T
            expected += 0.01 * f * p / 3
    assert moe.aux_loss is not None
    assert moe.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    moe.aux_loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0
    assert _moe(**GROUPED, aux_loss_alpha=0.0).train()(x) is not None
    assert _moe(**GROUPED, seq_aux=False).train().aux_loss is None


def test_softmax_scoring_and_unnormalized_weights() -> None:
    gate = _moe(**{**GROUPED, "n_group": 1, "topk_group": 1}, scoring_func="softmax", norm_topk_prob=False,
                routed_scaling_factor=1.0).gate
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(4))
    weights, indices, scores = gate(x)
    probs = torch.softmax(x @ gate.weight.T, dim=-1)
    torch.testing.assert_close(scores, probs)
    torch.testing.assert_close(weights, probs.gather(1, indices))
    biased = probs + gate.e_score_correction_bias
    assert all(set(i.tolist()) == set(b.topk(3).indices.tolist()) for i, b in zip(indices, biased, strict=True))


def test_correction_bias_stays_fp32_in_bf16_model() -> None:
    moe = _moe(**GROUPED)
    bias = moe.gate.e_score_correction_bias.clone()
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(moe.gate.e_score_correction_bias, bias)  # not rounded through bf16
    y = moe(torch.randn(1, 4, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_every_active_expert_runs_once() -> None:
    moe = _moe(**GROUPED).eval()
    calls = {i: 0 for i in range(12)}
    for i, e in enumerate(moe.experts):
        e.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    with torch.no_grad():
        moe(torch.randn(4, 9, 16))
    active = moe.last_expert_load > 0
    assert [calls[i] for i in range(12)] == active.long().tolist()
    assert list(itertools.compress(range(12), active.tolist()))  # at least one expert ran


def test_gradients_equal_per_token_reference() -> None:
    moe = _moe(**GROUPED).train()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    moe(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    gx = x.grad.clone()
    moe.zero_grad()
    x.grad = None
    weights, indices, _ = moe.gate(x.view(-1, 16))
    ref = torch.stack([
        sum(w * moe.experts[int(e)](t) for w, e in zip(weights[i], indices[i], strict=True))
        for i, t in enumerate(x.view(-1, 16))
    ]).view_as(x) + moe.shared_experts(x)
    ref.square().sum().backward()
    assert set(got) == {n for n, p in moe.named_parameters() if p.grad is not None}
    assert any(n.startswith("experts.") for n in got) and "gate.weight" in got
    for n, p in moe.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, x.grad, atol=1e-4, rtol=1e-4)
