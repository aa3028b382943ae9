"""`kimi_k2.model.decode.DecodeStep` (the function `compile_decode` compiles), run eagerly, against the model's own
decode step: same logits and latents, reading a paged pool through non-contiguous pages, blind to masked rows."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_tiny_model

from kimi_k2.model.decode import DecodeStep, check_decode_model, decode_weights
from kimi_k2.model.dense_cache import DenseLatentCache
from kimi_k2.ops.layout import stack_parameters
from kimi_k2.ops.quantize import quantize_linears

VARIANTS = {
    "q-lora": {},
    "no-q-lora-bias": {"q_lora_rank": None, "attention_bias": True},
    "grouped-router": {"n_group": 2, "topk_group": 1},
    "softmax-router": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
}
PAGE = 4


def _paged(cache: DenseLatentCache, n: int, pages: list[int], fill: float) -> torch.Tensor:
    """The first n cached tokens laid out as an engine page pool [L, (max(pages) + 1) * PAGE, C + R]; every other row
    holds `fill`."""
    latents = torch.cat([cache.c_kv[:, 0], cache.k_pe[:, 0]], dim=-1)  # [L, max_len, C + R]
    kv = torch.full((latents.shape[0], (max(pages) + 1) * PAGE, latents.shape[-1]), fill)
    for t in range(n):
        kv[:, pages[t // PAGE] * PAGE + t % PAGE] = latents[:, t]
    return kv


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_equals_model(variant: str) -> None:
    model = random_tiny_model(**VARIANTS[variant])
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    step = DecodeStep(cfg, model.model.rotary.attention_factor, PAGE)
    pages = [5, 2, 7, 0]  # out of order, with unused pages between
    with torch.no_grad():
        cache = DenseLatentCache.for_model(cfg, 1, 16)
        cache.begin([6])
        model(ids[:, :6], cache.positions(6), cache)
        cache.end()
        for pos in range(6, 11):
            kv = _paged(cache, pos, pages, fill=1e3)  # masked rows hold large values: must not leak in
            n = -(-pos // PAGE) + 1  # one padding page too
            logits, latents = step(decode_weights(model), ids[0, pos : pos + 1], torch.tensor(pos),
                                   torch.tensor(pages[:n]), kv)
            cache.begin([1])
            reference = model(ids[:, pos : pos + 1], cache.positions(1), cache)[0, 0]
            cache.end()
            torch.testing.assert_close(logits[0], reference, rtol=0, atol=1e-5)
            expected = torch.cat([cache.c_kv[:, 0, pos], cache.k_pe[:, 0, pos]], dim=-1)
            torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)


def test_stacked_experts_are_views_of_the_model() -> None:
    """After `stack_parameters` the [E, ...] stacks DecodeStep reads are the experts' own memory: no copy, so an
    in-place update of one expert is what the next step reads, and the state_dict keeps its names and values."""
    model = random_tiny_model()
    moe = model.model.layers[1].mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        stack_parameters([getattr(e, proj) for e in moe.experts], "weight")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    gate, up, down = decode_weights(model)["layers"][1]["experts"]
    assert gate.data_ptr() == moe.experts[0].gate_proj.weight.data_ptr()
    with torch.no_grad():
        moe.experts[3].up_proj.weight.mul_(2.0)
    torch.testing.assert_close(up[3], 2 * before["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert stack_parameters([e.up_proj for e in moe.experts], "weight").data_ptr() == up.data_ptr()  # already stacked


def test_check_decode_model_rejects_what_it_cannot_run() -> None:
    check_decode_model(random_tiny_model())
    with pytest.raises(ValueError, match="float32 models only.*bfloat16"):
        check_decode_model(random_tiny_model().to(torch.bfloat16))
    model = random_tiny_model()
    quantize_linears(model.model.layers[0], "int8")
    with pytest.raises(ValueError, match="float32 weights only; model.layers.0.self_attn.q_a_proj is int8"):
        check_decode_model(model)
