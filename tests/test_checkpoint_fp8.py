"""Block-FP8 quantization (kimi_k2.checkpoint.fp8) against the e4m3 rounding bound and a per-block reference.

Error bound. Quantization stores x = w / s with s = amax(|block|) / 448, so |x| <= 448. e4m3fn has 3 mantissa bits:
for a normal |x| in [2^e, 2^(e+1)) (e >= -6) the spacing is 2^(e-3), so round-to-nearest errs by at most
2^(e-4) <= |x| * 2^-4; below 2^-6 (subnormals) the spacing is 2^-9, so the error is at most 2^-10. Scaling back,
    |w - dequant(quant(w))| <= max(|w| * 2^-4, s * 2^-10)      elementwise, hence <= 2^-4 * amax(|block|).
"""

from __future__ import annotations

import math

import pytest
import torch

from kimi_k2.checkpoint import dequantize_block_fp8, is_quantized_name, quantize_block_fp8


def reference_dequant(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's weight_dequant, one block at a time (the obvious loop the vectorized code must equal)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    bm, bn = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def block_amax(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    bm, bn = block
    m, n = math.ceil(w.shape[0] / bm), math.ceil(w.shape[1] / bn)
    return torch.tensor([[w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].abs().max() for j in range(n)] for i in range(m)])


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (576, 130), (1, 1), (129, 127)])
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_round_trip_within_e4m3_bound(shape: tuple[int, int], block: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    # rows at very different magnitudes so blocks differ and small values reach the subnormal range
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[0])[:, None]
    q, s = quantize_block_fp8(w, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32
    assert tuple(s.shape) == (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    amax = block_amax(w, block)
    torch.testing.assert_close(s, amax / 448, rtol=1e-6, atol=0)
    # every block uses the full e4m3 range: its largest element maps to +-448
    assert torch.equal(block_amax(q.float(), block), torch.full_like(amax, 448.0))
    d = dequantize_block_fp8(q, s, block, torch.float32)
    assert torch.equal(d, reference_dequant(q, s, block))
    s_full = s.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]
    bound = torch.maximum(w.abs() * 2**-4, s_full * 2**-10) * (1 + 1e-5)
    assert ((d - w).abs() <= bound).all()
    assert ((d - w).abs() <= 2**-4 * amax.repeat_interleave(block[0], 0)[: shape[0]]
            .repeat_interleave(block[1], 1)[:, : shape[1]] * (1 + 1e-5)).all()


def test_bound_is_tight_enough_to_catch_a_coarser_format() -> None:
    # the measured error must actually approach 2^-4 relative: a 2-mantissa-bit format would break the bound above
    w = torch.linspace(1.0, 2.0, 128 * 128).reshape(128, 128)
    q, s = quantize_block_fp8(w)
    rel = ((dequantize_block_fp8(q, s, dtype=torch.float32) - w).abs() / w).max().item()
    assert 2**-6 < rel <= 2**-4


def test_zero_block_and_dtype() -> None:
    w = torch.zeros(130, 260, dtype=torch.bfloat16)
    w[129, 259] = 3.0
    q, s = quantize_block_fp8(w)
    assert torch.isfinite(s).all() and (s > 0).all()
    d = dequantize_block_fp8(q, s)  # default dtype bf16, as fp8_cast_bf16.py writes
    assert d.dtype == torch.bfloat16 and torch.equal(d.float(), w.float())


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize_block_fp8(torch.ones(4))
    with pytest.raises(ValueError, match="inf/nan"):
        quantize_block_fp8(torch.tensor([[1.0, float("inf")]]))
    q, s = quantize_block_fp8(torch.randn(200, 300))
    with pytest.raises(ValueError, match=r"expected \(2, 3\)"):
        dequantize_block_fp8(q, s[:1])


@pytest.mark.parametrize(("name", "quantized"), [
    ("model.layers.0.self_attn.q_a_proj.weight", True),
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", True),
    ("model.layers.0.self_attn.kv_b_proj.weight", True),
    ("model.layers.0.self_attn.o_proj.weight", True),
    ("model.layers.0.mlp.down_proj.weight", True),
    ("model.layers.3.mlp.experts.17.gate_proj.weight", True),
    ("model.layers.3.mlp.shared_experts.up_proj.weight", True),
    ("model.layers.3.mlp.gate.weight", False),
    ("model.layers.3.mlp.gate.e_score_correction_bias", False),
    ("model.layers.0.self_attn.q_a_layernorm.weight", False),
    ("model.layers.0.self_attn.kv_a_layernorm.weight", False),
    ("model.layers.0.input_layernorm.weight", False),
    ("model.embed_tokens.weight", False),
    ("model.norm.weight", False),
    ("lm_head.weight", False),
])
def test_quantized_names_follow_the_published_checkpoint(name: str, quantized: bool) -> None:
    assert is_quantized_name(name) is quantized
