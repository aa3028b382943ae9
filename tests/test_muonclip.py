import io
import math

import pytest
import torch
from torch import nn

from kimi_k2.train import MuonClip, param_groups, zeropower_via_newtonschulz5
from kimi_k2.train.muonclip import NS_COEFFICIENTS


def _grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in params]


def _run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, seed: int = 0) -> None:
    for t in range(steps):
        for p, g in zip(params, _grads(params, seed + t), strict=True):
            p.grad = g
        opt.step()


def _matrices(seed: int = 0, shapes=((48, 16), (16, 48), (32, 32), (64, 24))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in shapes]


def test_newton_schulz_is_the_quintic_on_singular_values():
    # NS maps G = U S V^T to U f^5(S / ||G||_F) V^T with f(x) = a x + b x^3 + c x^5
    a, b, c = NS_COEFFICIENTS
    for shape in [(24, 40), (40, 24), (32, 32)]:
        G = torch.randn(shape, dtype=torch.float64)
        s = torch.linalg.svdvals(G) / G.norm()
        for _ in range(5):
            s = a * s + b * s**3 + c * s**5
        out = torch.linalg.svdvals(zeropower_via_newtonschulz5(G, dtype=torch.float64))
        torch.testing.assert_close(out.sort().values, s.sort().values, rtol=1e-9, atol=1e-9)


def test_newton_schulz_output_singular_values_in_band():
    # inputs whose normalised singular values are not tiny land in the band the coefficients give (~0.68..1.13
    # per modded-nanogpt); sample the band from the scalar iteration itself
    a, b, c = NS_COEFFICIENTS
    x = torch.linspace(0.02, 1.0, 2000, dtype=torch.float64)
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    lo, hi = x.min().item(), x.max().item()
    assert 0.5 < lo < 1 < hi < 1.3
    for shape in [(16, 128), (128, 16), (64, 256)]:
        G = torch.randn(shape)  # well-conditioned: sigma_min / ||G||_F >> 0.02
        assert (torch.linalg.svdvals(G) / G.norm()).min() > 0.02
        sv = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
        assert lo - 1e-3 <= sv.min() and sv.max() <= hi + 1e-3
    batched = torch.randn(3, 16, 64)
    torch.testing.assert_close(zeropower_via_newtonschulz5(batched)[1], zeropower_via_newtonschulz5(batched[1]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon(nesterov):
    ours, ref = _matrices(), _matrices()
    opt = MuonClip(ours, lr=0.02, weight_decay=0.1, nesterov=nesterov, ns_dtype=torch.bfloat16)
    ref_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")
    _run(opt, ours, 5)
    _run(ref_opt, ref, 5)
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)  # same bf16 NS ops: equal up to fp32 rounding
    # fp32 NS (our CPU default) stays within bf16 error of torch's bf16 NS
    fp32, init = _matrices(), _matrices()
    _run(MuonClip(fp32, lr=0.02, weight_decay=0.1, nesterov=nesterov), fp32, 5)
    for p, q, p0 in zip(fp32, ref, init, strict=True):
        assert (p - q).norm() < 0.03 * (q - p0).norm()


def test_adamw_group_matches_torch_adamw():
    shapes = ((7,), (5, 9), (3, 4, 2))
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt = MuonClip([{"params": ours, "use_muon": False}], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    _run(opt, ours, 6)
    _run(ref_opt, ref, 6)
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p, q)  # the same ops in the same order as torch's single-tensor AdamW


@pytest.mark.parametrize("shape", [(64, 64), (256, 32), (32, 512), (96, 200)])
def test_update_rms_matches_adamw_scale(shape):
    # Moonlight eq. 4: lr * 0.2 * sqrt(max(A, B)) * O has RMS ~ 0.2 * lr (O's RMS ~ 1/sqrt(max(A, B)))
    w = nn.Parameter(torch.zeros(shape))
    lr = 1e-2
    opt = MuonClip([w], lr=lr, weight_decay=0.0)
    w.grad = torch.randn(shape)
    opt.step()
    rms = w.detach().pow(2).mean().sqrt().item()
    assert 0.15 * lr < rms < 0.25 * lr, rms / lr


def test_decoupled_weight_decay():
    w = nn.Parameter(torch.randn(8, 8))
    before = w.detach().clone()
    opt = MuonClip([w], lr=0.5, weight_decay=0.1)
    w.grad = torch.zeros_like(w)  # NS of a zero matrix is zero: only the decay acts
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - 0.5 * 0.1))


def test_per_head_blocks_and_expert_stacks_are_separate_matrices():
    H, rows, cols = 4, 6, 16
    w = nn.Parameter(torch.zeros(H * rows, cols))
    stack = nn.Parameter(torch.zeros(3, rows, cols))
    g_w, g_s = torch.randn(H * rows, cols), torch.randn(3, rows, cols)
    opt = MuonClip([{"params": [w], "block_rows": rows}, {"params": [stack]}], lr=1.0, weight_decay=0.0,
                   nesterov=False, momentum=0.0)
    w.grad, stack.grad = g_w.clone(), g_s.clone()
    opt.step()
    scale = 0.2 * math.sqrt(max(rows, cols))
    want_w = torch.cat([-scale * zeropower_via_newtonschulz5(b) for b in g_w.split(rows)])
    want_s = torch.stack([-scale * zeropower_via_newtonschulz5(m) for m in g_s])
    torch.testing.assert_close(w.detach(), want_w)
    torch.testing.assert_close(stack.detach(), want_s)


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 16)
        self.norm = nn.LayerNorm(16)
        self.up = nn.Linear(16, 24)  # weight -> Muon, bias -> AdamW
        self.down = nn.Linear(24, 16, bias=False)
        self.lm_head = nn.Linear(16, 32, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        h = h + self.down(torch.relu(self.up(self.norm(h))))
        return nn.functional.cross_entropy(self.lm_head(h)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _train(model: nn.Module, opt: MuonClip, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randint(0, 32, (4, 12), generator=g)).backward()
        opt.step()


def test_state_dict_round_trip_resumes_bitwise():
    torch.manual_seed(0)
    model = _Tiny()
    opt = MuonClip(param_groups(model, lr=1e-2), lr=1e-2)
    _train(model, opt, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = _Tiny()
    resumed.load_state_dict(saved["model"])
    resumed_opt = MuonClip(param_groups(resumed, lr=5.0), lr=5.0)  # hyper-parameters come from the state dict
    resumed_opt.load_state_dict(saved["opt"])
    _train(model, opt, 3, seed=2)
    _train(resumed, resumed_opt, 3, seed=2)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_param_groups_split_by_name():
    model = _Tiny()
    groups = {g["use_muon"]: g["names"] for g in param_groups(model, lr=1e-3, weight_decay=0.05)}
    assert groups[True] == ["up.weight", "down.weight"]
    assert sorted(groups[False]) == ["embed_tokens.weight", "lm_head.weight", "norm.bias", "norm.weight", "up.bias"]


def test_bad_groups_are_named():
    with pytest.raises(ValueError, match="norm.weight"):
        MuonClip([{"params": [nn.Parameter(torch.ones(4))], "names": ["norm.weight"]}])
    with pytest.raises(ValueError, match="block_rows=5"):
        MuonClip([nn.Parameter(torch.ones(8, 4))], block_rows=5)
    with pytest.raises(ValueError, match="momentum"):
        MuonClip([nn.Parameter(torch.ones(8, 4))], momentum=1.0)
    opt = MuonClip([nn.Parameter(torch.ones(8, 4))])
    with pytest.raises(ValueError, match="param group 1: Muon param up.bias"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(4))], "names": ["up.bias"]})
    with pytest.raises(ValueError, match="per_head"):
        param_groups(_Tiny(), lr=1e-3, per_head=True)

