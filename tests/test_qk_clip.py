"""QK-Clip against a small stand-in MLA with K2's weight names and row layouts."""

import pytest
import torch
from torch import nn

from kimi_k2.config import K2Config
from kimi_k2.train import MuonClip, QKClip, param_groups


def _rope(x: torch.Tensor) -> torch.Tensor:  # [B, H, T, d] -> rotary by position (a linear map per position)
    T, d = x.shape[-2], x.shape[-1]
    theta = torch.arange(T)[:, None] / 100.0 ** (torch.arange(d // 2) / (d // 2))
    cos, sin = theta.cos(), theta.sin()
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class StandInMLA(nn.Module):
    def __init__(self, cfg: K2Config) -> None:
        super().__init__()
        self.H, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                             cfg.v_head_dim)
        self.kv_lora, self.scale = cfg.kv_lora_rank, cfg.softmax_scale
        D, q_out = cfg.hidden_size, self.H * (self.dn + self.dr)
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(D, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora + self.dr, bias=False)
        self.kv_b_proj = nn.Linear(self.kv_lora, self.H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.H * self.dv, D, bias=False)
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [B, T, D] -> [B, H, T, T], v
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_proj(x)) if hasattr(self, "q_b_proj") else self.q_proj(x)
        q = q.view(B, T, self.H, self.dn + self.dr).transpose(1, 2)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.dr], dim=-1)
        kv = self.kv_b_proj(c_kv).view(B, T, self.H, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        k_pe = _rope(k_pe[:, None])  # [B, 1, T, dr]: one rotary key shared by all heads
        s = (q_nope @ k_nope.mT + _rope(q_pe) @ k_pe.mT) * self.scale
        return s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, v = self.logits(x)
        if self.track_max_logits:
            self.max_logits = s.detach().amax(dim=(0, 2, 3)).float()
        o = (s.softmax(-1) @ v).transpose(1, 2).flatten(2)
        return self.o_proj(o)


class StandInLayer(nn.Module):
    def __init__(self, cfg: K2Config) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size)
        self.self_attn = StandInMLA(cfg)


class StandInModel(nn.Module):
    def __init__(self, cfg: K2Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(StandInLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = h + layer.self_attn(layer.input_layernorm(h))
        logits = self.lm_head(h)
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _model(q_lora: bool = True, seed: int = 0) -> StandInModel:
    cfg = K2Config.from_preset("k2-tiny")
    cfg = cfg if q_lora else cfg.replace(q_lora_rank=None)
    torch.manual_seed(seed)
    model = StandInModel(cfg)
    with torch.no_grad():  # large q/k weights so some heads have big logits
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
    return model


def _max_logits(model: StandInModel, x: torch.Tensor) -> torch.Tensor:  # [L, H]
    with torch.no_grad():
        return torch.stack([layer.self_attn.logits(x)[0].amax(dim=(0, 2, 3)) for layer in model.model.layers])


def _x(model: StandInModel) -> torch.Tensor:
    return torch.randn(2, 10, model.config.hidden_size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("q_lora", [True, False])
def test_clip_brings_every_head_to_tau_and_leaves_the_rest_bit_identical(q_lora):
    model = _model(q_lora)
    x = _x(model)
    before = _max_logits(model, x)
    tau = before.flatten().median().item()  # about half the heads above tau
    assert (before > tau).any() and (before <= tau).any()
    old_logits = [layer.self_attn.logits(x)[0].detach() for layer in model.model.layers]
    old = {k: v.clone() for k, v in model.state_dict().items()}

    clip = QKClip(model, tau)
    clip.enable()
    for layer in model.model.layers:
        layer.self_attn(x)
    stats = clip.apply()

    after = _max_logits(model, x)
    assert (after <= tau * (1 + 1e-5)).all()
    torch.testing.assert_close(after[before > tau], torch.full_like(after[before > tau], tau))
    assert torch.equal(after[before <= tau], before[before <= tau])
    torch.testing.assert_close(stats.max_logits, before)
    assert stats.heads_clipped.tolist() == (before > tau).sum(dim=-1).tolist()

    cfg = model.config
    H, dn, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_name = "q_b_proj" if q_lora else "q_proj"
    sd = model.state_dict()
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}.self_attn."
        gamma = stats.gamma[i]
        # every logit of a clipped head scales by exactly gamma_h (nope part by sqrt*sqrt, rope part by gamma)
        new_logits = layer.self_attn.logits(x)[0].detach()
        finite = old_logits[i].isfinite()
        torch.testing.assert_close(new_logits[finite], (old_logits[i] * gamma[None, :, None, None])[finite],
                                   rtol=1e-5, atol=1e-4)
        wq, wq0 = sd[p + f"{q_name}.weight"].view(H, dn + dr, -1), old[p + f"{q_name}.weight"].view(H, dn + dr, -1)
        wkv, wkv0 = sd[p + "kv_b_proj.weight"].view(H, dn + dv, -1), old[p + "kv_b_proj.weight"].view(H, dn + dv, -1)
        for h in range(H):
            g = gamma[h]
            torch.testing.assert_close(wq[h, :dn], wq0[h, :dn] * g.sqrt())
            torch.testing.assert_close(wq[h, dn:], wq0[h, dn:] * g)
            torch.testing.assert_close(wkv[h, :dn], wkv0[h, :dn] * g.sqrt())
            assert torch.equal(wkv[h, dn:], wkv0[h, dn:])  # v rows untouched
            if g == 1:
                assert torch.equal(wq[h], wq0[h]) and torch.equal(wkv[h], wkv0[h])
    for k in sd:
        if not k.endswith((f"{q_name}.weight", "kv_b_proj.weight")):
            assert torch.equal(sd[k], old[k]), k  # kv_a_proj_with_mqa (shared k_pe), o_proj, norms: untouched


def test_record_keeps_the_max_over_micro_batches_and_negative_logits_are_not_clipped():
    model = _model()
    attn = model.model.layers[0].self_attn
    clip = QKClip(model, tau=1.0)
    clip.enable()
    H = model.config.num_attention_heads
    for layer in model.model.layers[1:]:
        layer.self_attn.max_logits = torch.full((H,), -5.0)
    attn.max_logits = torch.tensor([3.0, 0.5, -2.0, 1.0])
    clip.record()
    assert attn.max_logits is None
    attn.max_logits = torch.tensor([1.0, 4.0, -1.0, 0.5])
    stats = clip.apply()
    assert stats.max_logits[0].tolist() == [3.0, 4.0, -1.0, 1.0]
    torch.testing.assert_close(stats.gamma[0], torch.tensor([1 / 3, 1 / 4, 1.0, 1.0]))
    assert (stats.gamma[1:] == 1).all()
    assert stats.as_dict()["qk_clip/heads_clipped"] == 2.0


def test_errors_name_the_problem():
    model = _model()
    clip = QKClip(model, tau=10.0)
    with pytest.raises(RuntimeError, match="no max logits recorded"):
        clip.apply()
    for layer in model.model.layers:
        layer.self_attn.max_logits = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="model.layers.0.self_attn"):
        clip.apply()
    model.model.layers[0].self_attn.max_logits = torch.zeros(3)
    with pytest.raises(ValueError, match=r"max_logits has shape \(3,\)"):
        clip.record()
    with pytest.raises(ValueError, match="tau"):
        QKClip(model, tau=0.0)
    model.model.layers[1].self_attn.kv_b_proj = nn.Linear(32, 7, bias=False)
    with pytest.raises(ValueError, match="layers.1.self_attn.kv_b_proj.weight has shape"):
        QKClip(model)
    with pytest.raises(ValueError, match="model.config"):
        QKClip(nn.Linear(2, 2))
    model.model.layers = nn.ModuleList()
    with pytest.raises(ValueError, match="track_max_logits"):
        QKClip(model)


def test_muonclip_step_clips_with_this_steps_logits():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = MuonClip(param_groups(model, lr=1e-2, per_head=True))
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        x0 = model.model.layers[0].input_layernorm(h)
        tau = model.model.layers[0].self_attn.logits(x0)[0].amax().item() / 2  # layer 0 has heads above tau
    clip = opt.attach_qk_clip(model, tau=tau)
    assert all(layer.self_attn.track_max_logits for layer in model.model.layers)
    for step in range(3):
        opt.zero_grad()
        model(ids).backward()
        recorded = [layer.self_attn.max_logits.clone() for layer in model.model.layers]
        opt.step()
        stats = opt.qk_clip_stats
        assert torch.equal(stats.max_logits, torch.stack(recorded))
        assert stats.heads_clipped.sum() == (stats.max_logits > clip.tau).sum()
        if step == 0:
            assert stats.heads_clipped[0] > 0  # the step-0 forward saw layer 0's initial logits, 2x tau


def _k2_attention_inputs(model, ids: torch.Tensor) -> list[tuple]:
    """Each attention's (x, cos, sin) in one forward: clipping layer i changes what layers > i see."""
    seen, hooks = [], [layer.self_attn.register_forward_pre_hook(lambda m, args: seen.append(args))
                       for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def _k2_max_logits(model, inputs: list[tuple]) -> torch.Tensor:  # [L, H]: each attention on its recorded input
    with torch.no_grad():
        for layer, args in zip(model.model.layers, inputs, strict=True):
            layer.self_attn(*args)
    return torch.stack([layer.self_attn.max_logits for layer in model.model.layers])


@pytest.mark.parametrize("q_lora", [True, False])
def test_k2_model_end_to_end(q_lora):
    from kimi_k2.model import K2ForCausalLM

    cfg = K2Config.from_preset("k2-tiny")
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(cfg if q_lora else cfg.replace(q_lora_rank=None))
    with torch.no_grad():  # grow q/k so the logits spread out
        for layer in model.model.layers:
            attn = layer.self_attn
            (attn.q_b_proj if q_lora else attn.q_proj).weight.mul_(20.0)
            attn.kv_b_proj.weight.mul_(20.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    clip = QKClip(model, tau=1.0)
    clip.enable()
    inputs = _k2_attention_inputs(model, ids)  # the tracked forward of the step
    before = torch.stack([layer.self_attn.max_logits for layer in model.model.layers])
    clip.tau = tau = before.flatten().median().item()
    old = {k: v.clone() for k, v in model.state_dict().items()}
    stats = clip.apply()
    after = _k2_max_logits(model, inputs)
    assert (before > tau).any() and (before <= tau).any()
    assert (after <= tau * (1 + 1e-5)).all()
    assert torch.equal(after[before <= tau], before[before <= tau])
    assert stats.heads_clipped.sum() == (before > tau).sum()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, old[k])}
    want = {f"model.layers.{i}.self_attn.{w}.weight" for i in range(cfg.num_hidden_layers)
            for w in ("q_b_proj" if q_lora else "q_proj", "kv_b_proj") if (before[i] > tau).any()}
    assert changed == want


def test_k2_param_groups_and_training_step():
    from kimi_k2.model import K2ForCausalLM

    cfg = K2Config.from_preset("k2-tiny")
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(cfg)
    groups = param_groups(model, lr=1e-3, per_head=True)
    names = {n: g["use_muon"] for g in groups for n in g["names"]}
    assert set(names) == {n for n, _ in model.named_parameters()}
    assert not any("e_score_correction_bias" in n for n in names)
    assert names["model.embed_tokens.weight"] is False and names["lm_head.weight"] is False
    assert names["model.layers.1.mlp.gate.weight"] is True and names["model.layers.1.mlp.experts.0.up_proj.weight"]
    assert names["model.norm.weight"] is False
    per_head = {g["block_rows"]: g["names"] for g in groups if g["use_muon"] and g["block_rows"]}
    assert per_head[cfg.qk_head_dim][0].endswith("q_b_proj.weight")
    assert per_head[cfg.qk_nope_head_dim + cfg.v_head_dim][0].endswith("kv_b_proj.weight")

    opt = MuonClip(groups)
    opt.attach_qk_clip(model, tau=100.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        logits = model(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.qk_clip_stats.max_logits.shape == (cfg.num_hidden_layers, cfg.num_attention_heads)
    assert torch.equal(model.model.layers[1].mlp.gate.e_score_correction_bias, bias)


def _dp_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(seed=0)  # same replica on every rank
        clip = QKClip(model, tau=2.0)
        for i, layer in enumerate(model.model.layers):  # each rank saw a different micro-batch
            layer.self_attn.max_logits = torch.tensor([1.0, 4.0, 1.0, 3.0]) if rank == 0 else torch.full((4,), i + 1.5)
        stats = clip.apply()
        torch.save({"gamma": stats.gamma, "weights": model.state_dict()}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # the same QKClip.apply max over ranks in the default run: test_fsdp.py's check_muonclip
def test_data_parallel_ranks_clip_with_the_global_max(tmp_path):
    torch.multiprocessing.spawn(_dp_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    want = torch.maximum(torch.tensor([[1.0, 4.0, 1.0, 3.0]] * 3), torch.tensor([1.5, 2.5, 3.5])[:, None])
    torch.testing.assert_close(r0["gamma"], torch.where(want > 2.0, 2.0 / want, torch.ones_like(want)))
    assert torch.equal(r0["gamma"], r1["gamma"])
    assert all(torch.equal(v, r1["weights"][k]) for k, v in r0["weights"].items())
