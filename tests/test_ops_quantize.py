"""Low-precision weights (`kimi_k2.ops.quantize`, `kimi_k2.model.quantized`): each linear against its float
reference, whole models against fp32 on fixed tokens with a stated error, and a block-FP8 checkpoint quantized at
load equal to the same model quantized in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import random_tiny_model
from torch import nn

from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.quantized import load_quantized, quantize_model
from kimi_k2.ops.quantize import QuantizedLinear, quantize_int8, quantize_linears
from kimi_k2.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
NANO, NANO_TEXT = ROOT / "models" / "k2-nano-instruct", ROOT / "kimi_k2" / "eval" / "tasks" / "chat.jsonl"
IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


def test_int8_weights_round_trip_within_half_a_step() -> None:
    """Q8_0: one fp16 scale per 32 weights of a row, |W_q| <= 127, every weight within half a step of W_q * d."""
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q, d = quantize_int8(w)
    assert q.dtype == torch.int8 and d.dtype == torch.float16 and d.shape == (48, 3) and int(q.abs().max()) == 127
    step = d.float().repeat_interleave(32, dim=1)
    assert bool(((q.float() * step - w).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("fmt, tol", [("int8", 0.01), ("fp16", 1e-3)])
def test_quantized_linear_matches_float(fmt: str, tol: float) -> None:
    """Relative error (Frobenius) of y = x W^T + b: fp16 weights ~3e-4; int8 (Q8_0 weights and activations) ~0.5%."""
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(256, 96)
    with torch.no_grad():
        lin.weight.normal_(0, 256**-0.5, generator=g)
        lin.bias.normal_(0, 0.1, generator=g)
    q = QuantizedLinear.from_float(lin.weight, lin.bias, fmt)
    for shape in ((1, 256), (3, 5, 256)):
        x = torch.randn(*shape, generator=g)
        ref, y = lin(x).detach(), q(x)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert float((y - ref).norm() / ref.norm()) < tol
    with pytest.raises(ValueError, match="unknown weight format 'int4'"):
        QuantizedLinear.from_float(lin.weight, None, "int4")


def test_int8_linear_holds_the_packed_layout_and_dequantizes_row_major() -> None:
    """An int8 QuantizedLinear stores the kernel's packed order (made once) and `dequantized` gives back W's rows in
    order; out_features not divisible by 8 is refused by the module and left float by `quantize_linears`."""
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    q = QuantizedLinear.from_float(w, None, "int8")
    rows_q, rows_d = quantize_int8(w)
    assert not torch.equal(q.weight, rows_q)
    assert torch.equal(q.dequantized(), rows_q.float() * rows_d.float().repeat_interleave(32, dim=1))
    with pytest.raises(ValueError, match="out_features by 8, got 64 and 12"):
        QuantizedLinear.from_float(torch.randn(12, 64), None, "int8")
    model = nn.Sequential(nn.Linear(64, 12), nn.Linear(64, 16))
    assert quantize_linears(model, "int8") == ["1"] and isinstance(model[0], nn.Linear)


def test_quantize_linears_replaces_all_but_kept() -> None:
    model = random_tiny_model()
    done = quantize_linears(model, "fp16", keep=lambda name: name.endswith("o_proj"))
    assert "lm_head" in done and "model.layers.1.mlp.experts.7.down_proj" in done
    assert not any(n.endswith("o_proj") for n in done)
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == len(done)


@pytest.mark.parametrize("fmt, max_ppl_change, min_agree", [("fp16", 1e-3, 0.99), ("int8", 0.02, 0.9)])
def test_nano_model_perplexity_against_fp32(fmt: str, max_ppl_change: float, min_agree: float) -> None:
    """The stated cost of each format on the shipped nano model over a fixed text (1024 tokens of the eval chat
    tasks): perplexity change and greedy-argmax agreement with fp32 (measured: fp16 +0.04% / 99.6%, int8 -0.11% /
    96.3%; every projection quantized, kv_b_proj and attention included)."""
    reference_model = K2ForCausalLM.from_pretrained(NANO, dtype=torch.float32)
    model = load_quantized(NANO, fmt)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.tensor([Tokenizer.from_pretrained(NANO).encode(NANO_TEXT.read_text())[:1024]])
    with torch.no_grad():
        reference, logits = reference_model(ids)[0], model(ids)[0]
    ppl = [float(F.cross_entropy(x[:-1], ids[0, 1:]).exp()) for x in (reference, logits)]
    assert abs(ppl[1] / ppl[0] - 1) < max_ppl_change
    assert float((logits.argmax(-1) == reference.argmax(-1)).float().mean()) >= min_agree


def test_int8_rows_do_not_depend_on_the_batch() -> None:
    """Activations are quantized per row (32-blocks): a token's logits are the same alone and in a batch with others
    (up to fp32 rounding: a batch of 6+ rows per weight multiplies the same quantized values in fp32)."""
    model = quantize_model(random_tiny_model(), "int8")
    with torch.no_grad():
        alone = model(IDS[:1, :1])
        batched = model(torch.cat([IDS[:1], IDS[1:] * 3 % 512]))[:1, :1]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)


def test_fp8_checkpoint_quantized_at_load_equals_in_memory(tmp_path) -> None:
    """A block-FP8 checkpoint read one projection at a time (`load_quantized`) gives the model that quantizing the
    dequantized checkpoint in memory gives, and serves through the engine."""
    random_tiny_model(attention_bias=True).save_pretrained(tmp_path, fp8=True)
    loaded = load_quantized(tmp_path, "int8")
    in_memory = quantize_model(K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), "int8")
    assert loaded.model.layers[0].mlp.gate_proj.fmt == "int8" and loaded.lm_head.fmt == "int8"
    assert loaded.model.layers[0].self_attn.kv_b_proj.fmt == "int8"  # every projection, as a Q8_0 GGUF
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), in_memory(IDS), rtol=0, atol=1e-5)
    config = EngineConfig(num_pages=32, max_model_len=64, compile_decode=True)
    engine = LLMEngine(loaded, config=config)
    assert engine.runner.decoder is not None  # the compiled decode serves int8 weights
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [IDS[0, :5].tolist(), IDS[1, :9].tolist()]
    together = [r[0].token_ids for r in engine.generate(prompts, params)]
    assert together[0] == engine.generate(prompts[:1], params)[0][0].token_ids  # batch-invariant
    assert together == [r[0].token_ids for r in LLMEngine(in_memory, config=config).generate(prompts, params)]
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load_quantized(tmp_path, "int4")


def test_offloaded_experts_use_the_same_int8_linears(tmp_path) -> None:
    """`load_offloaded(quantization="int8")`: experts read from the mapped fp8 checkpoint when routed to, on the same
    int8 kernels, give the logits of the model quantized at load."""
    from kimi_k2.deploy.offload import OffloadedExpert, load_offloaded

    random_tiny_model().save_pretrained(tmp_path, fp8=True)
    offloaded = load_offloaded(tmp_path, quantization="int8", cache_experts=4)
    assert isinstance(offloaded.model.layers[1].mlp.experts[0], OffloadedExpert)
    with torch.no_grad():
        torch.testing.assert_close(offloaded(IDS), load_quantized(tmp_path, "int8")(IDS), rtol=0, atol=1e-5)
