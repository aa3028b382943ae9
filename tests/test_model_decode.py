"""`kimi_k2.model.decode.DecodeStep` (the function `compile_decode` compiles), run eagerly, against the model's own
decode step: same logits and latents, reading a paged pool through non-contiguous pages, blind to masked rows, for
one sequence or a batch at different positions, on fp32, fp16 and int8 weights."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_tiny_model

from kimi_k2.model.decode import Absorbed, DecodeStep, _absorbed, check_decode_model, decode_weights
from kimi_k2.model.dense_cache import DenseLatentCache
from kimi_k2.model.functional import latent_attention
from kimi_k2.model.grouped_experts import GroupedExperts
from kimi_k2.model.quantized import quantize_model
from kimi_k2.ops.kernels import dequantize_blocks, unpack_q8
from kimi_k2.ops.quantize import QuantizedLinear

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


def _prefilled(model, ids: torch.Tensor, n: int) -> DenseLatentCache:
    cache = DenseLatentCache.for_model(model.config, ids.shape[0], 16)
    cache.begin([n] * ids.shape[0])
    model(ids[:, :n], cache.positions(n), cache)
    cache.end()
    return cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_equals_model(variant: str) -> None:
    model = random_tiny_model(**VARIANTS[variant])
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    step = DecodeStep(cfg, model.model.rotary.attention_factor, PAGE)
    pages = [5, 2, 7, 0]  # out of order, with unused pages between
    with torch.no_grad():
        cache = _prefilled(model, ids, 6)
        for pos in range(6, 11):
            kv = _paged(cache, pos, pages, fill=1e3)  # masked rows hold large values: must not leak in
            n = -(-pos // PAGE) + 1  # one padding page too
            logits, latents = step(decode_weights(model), ids[0, pos : pos + 1], torch.tensor([pos]),
                                   torch.tensor([pages[:n]]), kv)
            cache.begin([1])
            reference = model(ids[:, pos : pos + 1], cache.positions(1), cache)[0, 0]
            cache.end()
            torch.testing.assert_close(logits[0], reference, rtol=0, atol=1e-5)
            expected = torch.cat([cache.c_kv[:, 0, pos], cache.k_pe[:, 0, pos]], dim=-1)
            torch.testing.assert_close(latents[:, 0], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
def test_batched_decode_step_equals_model(fmt: str) -> None:
    """Three sequences at positions 3, 9 and 6 in one step (each its own pages) give each one's own logits and
    latents: those of the model (quantized alike) decoding it alone."""
    model = random_tiny_model()
    if fmt != "fp32":
        quantize_model(model, fmt)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (3, 10), generator=torch.Generator().manual_seed(4))
    positions, tables = [3, 9, 6], [[1, 4, 9], [0, 6, 3], [8, 2, 5]]
    step = DecodeStep(cfg, model.model.rotary.attention_factor, PAGE)
    kv = torch.full((cfg.num_hidden_layers, 10 * PAGE, cfg.kv_lora_rank + cfg.qk_rope_head_dim), 1e3)
    references, expected = [], []
    with torch.no_grad():
        for b, pos in enumerate(positions):
            cache = _prefilled(model, ids[b : b + 1], pos)
            kv_b = _paged(cache, pos, tables[b], fill=0.0)
            for t in range(pos):
                slot = tables[b][t // PAGE] * PAGE + t % PAGE
                kv[:, slot] = kv_b[:, slot]
            cache.begin([1])
            references.append(model(ids[b : b + 1, pos : pos + 1], cache.positions(1), cache)[0, 0])
            cache.end()
            expected.append(torch.cat([cache.c_kv[:, 0, pos], cache.k_pe[:, 0, pos]], dim=-1))
        logits, latents = step(decode_weights(model), ids[torch.arange(3), positions], torch.tensor(positions),
                               torch.tensor(tables), kv)
    torch.testing.assert_close(logits, torch.stack(references), rtol=0, atol=1e-4)
    torch.testing.assert_close(latents, torch.stack(expected, dim=1), rtol=0, atol=1e-5)


def test_packed_experts_are_views_of_the_model() -> None:
    """The [E, 2I, D] gate | up and [E, D, I] down stacks DecodeStep reads are the experts' own memory: no copy, so
    an in-place update of one expert is what the next step reads, and the state_dict keeps its names and values."""
    model = random_tiny_model()
    moe = model.model.layers[1].mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe.experts = GroupedExperts(moe.experts)
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    (gate_up, _), (down, _) = decode_weights(model)["layers"][1]["experts"]
    inter = moe.experts[0].up_proj.weight.shape[0]
    assert gate_up.data_ptr() == moe.experts[0].gate_proj.weight.data_ptr()
    with torch.no_grad():
        moe.experts[3].up_proj.weight.mul_(2.0)
    torch.testing.assert_close(gate_up[3, inter:], 2 * before["model.layers.1.mlp.experts.3.up_proj.weight"])
    torch.testing.assert_close(down[2], before["model.layers.1.mlp.experts.2.down_proj.weight"])


def test_check_decode_model_rejects_what_it_cannot_run() -> None:
    check_decode_model(random_tiny_model())
    check_decode_model(quantize_model(random_tiny_model(), "int8"))
    with pytest.raises(ValueError, match="float32 or quantized.*bfloat16"):
        check_decode_model(random_tiny_model().to(torch.bfloat16))


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_quantized_kv_b_is_absorbed_in_its_format(fmt: str) -> None:
    """A quantized kv_b_proj reaches the absorbed attention as per-head W_UK^T [H, C, nope] and W_UV [H, v, C] in its
    own format (not an fp32 copy): fp16 exactly kv_b_proj's halves; int8 W_UV kv_b_proj's own Q8_0 rows and W_UK^T
    requantized along nope (within both roundings); the attention over them is `latent_attention` over the same
    weights dequantized, up to int8's per-call quantization of q_nope and o_lat."""
    H, nope, v, C, R, B, T = 4, 32, 32, 64, 16, 3, 9
    g = torch.Generator().manual_seed(0)
    kv_b = QuantizedLinear.from_float(torch.randn(H * (nope + v), C, generator=g) / C**0.5, None, fmt)
    w = _absorbed(kv_b, H, nope)
    assert isinstance(w, Absorbed) and w.uk.weight.shape == (H, C, nope) and w.uv.weight.shape == (H, v, C)
    assert w.uk.weight.dtype == w.uv.weight.dtype == kv_b.weight.dtype
    rows = kv_b.dequantized().view(H, nope + v, C)
    uk, uv = (p.weight.float() if p.scales is None else dequantize_blocks(*unpack_q8(*p)) for p in (w.uk, w.uv))
    assert torch.equal(uv, rows[:, nope:])
    if fmt == "fp16":
        assert torch.equal(uk, rows[:, :nope].transpose(1, 2))
    else:  # |error| <= half of W_UK^T's own Q8_0 step (amax / 127 per 32 along nope, stored as fp16)
        step = (rows[:, :nope].transpose(1, 2).unflatten(-1, (-1, 32)).abs().amax(-1) / 127).half().float()
        assert ((uk - rows[:, :nope].transpose(1, 2)).unflatten(-1, (-1, 32)).abs() <= step[..., None] / 2 + 1e-7).all()
    q_nope, q_pe = torch.randn(B, H, nope, generator=g), torch.randn(B, H, R, generator=g)
    c_kv, k_pe = torch.randn(B, T, C, generator=g), torch.randn(B, T, R, generator=g)
    mask = torch.zeros(B, 1, T).index_fill_(2, torch.arange(5, T), float("-inf"))
    step = DecodeStep(random_tiny_model().config, 1.0, PAGE)
    out = step._absorbed_attention(w, q_nope, q_pe, c_kv, k_pe, mask)
    reference, _ = latent_attention(q_nope[:, None], q_pe[:, None], c_kv, k_pe, mask, uk.transpose(1, 2),
                                    uv.transpose(1, 2), step.scale)
    atol = 1e-5 if fmt == "fp16" else 2e-2 * reference.abs().max().item()
    torch.testing.assert_close(out, reference.reshape(B, -1), rtol=0, atol=atol)
    # each sequence gets the row it gets alone (int8's kernel is batch-invariant to the bit)
    alone = step._absorbed_attention(w, q_nope[1:2], q_pe[1:2], c_kv[1:2], k_pe[1:2], mask[1:2])
    torch.testing.assert_close(alone, out[1:2], rtol=0, atol=1e-6)


def test_int8_kv_b_keeps_fp32_where_the_kernels_cannot_take_it() -> None:
    """int8 W_UK^T needs nope divisible by 32 (its Q8_0 blocks): k2-tiny's 16 keeps the dequantized fp32 kv_b."""
    model = quantize_model(random_tiny_model(), "int8")
    kv_b = decode_weights(model)["layers"][0]["kv_b"]
    assert isinstance(kv_b, torch.Tensor) and kv_b.dtype == torch.float32
    assert torch.equal(kv_b, model.model.layers[0].self_attn.kv_b_proj.dequantized())
