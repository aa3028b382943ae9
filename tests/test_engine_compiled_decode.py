"""`EngineConfig(compile_decode=True)`: decode steps (one sequence or a batch) through the torch.compile'd `DecodeStep`
give the eager engine's greedy tokens and logprobs, follow weight changes, and refuse models they cannot run. The
single-sequence graph is built at start-up, the batched one in the background from the first batch on (eager
batches until then); after that no step of any context length or pool size compiles again (dynamo's
`error_on_recompile`).

The default run compiles the two graphs once per weight format (k2-tiny, ~20-40 s on a 2-core CPU); the config
variants are `slow` (one compile each).
"""

from __future__ import annotations

import logging

import pytest
import torch
from engine_fixtures import PROMPT_LENGTHS, assert_batch_same
from model_fixtures import random_tiny_model

from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams
from kimi_k2.engine.compiled_decode import CompiledDecoder
from kimi_k2.engine.model_runner import ModelRunner
from kimi_k2.engine.paged_cache import Row
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.quantized import quantize_model


def _engine(model: K2ForCausalLM, compile_decode: bool, num_pages: int = 32) -> LLMEngine:
    config = EngineConfig(page_size=16, num_pages=num_pages, max_model_len=96, max_num_seqs=4,
                          enable_prefix_caching=False, compile_decode=compile_decode)
    return LLMEngine(model, config=config)


def no_recompiles():
    return torch._dynamo.config.patch(error_on_recompile=True)


def _assert_same(model: K2ForCausalLM, compiled: LLMEngine, eager: LLMEngine, new: int = 20,
                 atol: float = 1e-4) -> None:
    gen = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=5)
    for n in PROMPT_LENGTHS:
        prompt = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
        with no_recompiles():
            a = compiled.generate([prompt], params)[0][0]
        b = eager.generate([prompt], params)[0][0]
        assert a.token_ids == b.token_ids, f"prompt of {n} tokens"
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            torch.testing.assert_close(torch.tensor([v for _, v in x.top]), torch.tensor([v for _, v in y.top]),
                                       rtol=0, atol=atol)


def test_compiled_decode_equals_eager_engine() -> None:
    model = random_tiny_model()
    compiled, eager = _engine(model, True), _engine(model, False)
    _assert_same(model, compiled, eager)
    assert set(compiled.runner.decoder.compile_seconds) == {False}  # single streams only: no batched graph built
    with torch.no_grad():  # in-place weight updates reach the compiled path (packed experts, fused views) ...
        model.model.layers[1].mlp.experts[0].down_proj.weight.mul_(-1.5)
        model.model.layers[2].self_attn.kv_a_proj_with_mqa.weight.mul_(0.5)
        shared = model.model.layers[1].mlp.shared_experts.down_proj  # ... and so does a replaced tensor
        shared.weight = torch.nn.Parameter(shared.weight * -2.0)
    _assert_same(model, compiled, eager, new=6)
    # a pool of another size on the same graphs; its first batch runs the eager model while the batched graph
    # compiles in the background, later ones the graph
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[3, 4, 5], list(range(2, 30))]
    expected = [r[0].token_ids for r in eager.generate(prompts, params)]
    with no_recompiles():
        other = _engine(model, True, num_pages=40)
    assert [r[0].token_ids for r in other.generate(prompts, params)] == expected
    assert other.runner.decoder.wait_batched()
    assert [r[0].token_ids for r in other.generate(prompts, params)] == expected


def test_compiled_decode_of_a_model_with_biases_after_one_without() -> None:
    """A model whose weight dict has optional entries (attention biases) that another model's lacks gets its own graph,
    not the other's (the weight dict's structure is guarded)."""
    plain, biased = random_tiny_model(), random_tiny_model(attention_bias=True)
    with torch.no_grad():
        for m in biased.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.uniform_(-2.0, 2.0)
    _engine(plain, True)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert _engine(biased, True).generate([[1, 2, 3]], params)[0][0].token_ids == \
        _engine(biased, False).generate([[1, 2, 3]], params)[0][0].token_ids


@pytest.mark.parametrize("fmt", ["int8", pytest.param("fp16", marks=pytest.mark.slow)])
def test_compiled_decode_of_quantized_weights_equals_eager(fmt: str) -> None:
    """`--quantization int8|fp16`: the compiled graph runs the same kernels (`kimi_k2::linear_q8` / `linear_f16`,
    opaque to inductor) on the same fused / packed weights as the eager quantized model."""
    model = quantize_model(random_tiny_model(), fmt)
    compiled, eager = _engine(model, True), _engine(model, False)
    assert compiled.runner.decoder is not None
    # int8 quantizes activations per call (Q8_0): a last-bit difference between the graph's and the eager norm can
    # move one value across a rounding boundary (a logprob then differs by ~1e-2; seen with the Q8_0 embedding table)
    _assert_same(model, compiled, eager, new=10, atol=1e-4 if fmt == "fp16" else 2e-2)
    _assert_batch_same(model, compiled, eager)


def test_compiled_decode_logits_and_latents_equal_eager_runner() -> None:
    model = random_tiny_model()
    compiled = _engine(model, True).runner
    eager = ModelRunner(model, compiled.pool)  # same pool: the eager runner's prefill is what both decode from
    prompt = torch.randint(0, model.config.vocab_size, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    table = [4, 1, 6]  # pages out of order
    eager.forward([[Row(prompt, 0, table, True)]])
    for runner in (eager, compiled):  # both write token 21's latents to the same slot
        logits = runner.forward([[Row([7], 21, table, True)]])
        latents = compiled.pool.kv[:, 1 * 16 + 5].clone()
        if runner is eager:
            reference, reference_latents = logits, latents
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-4)
    torch.testing.assert_close(latents, reference_latents, rtol=0, atol=1e-5)


def _assert_batch_same(model: K2ForCausalLM, compiled: LLMEngine, eager: LLMEngine) -> None:
    """Mixed batch (`engine_fixtures.assert_batch_same`) once the batched graph is ready."""
    decoder = compiled.runner.decoder
    if not decoder.batched_ready():  # starts the background compile
        assert decoder.wait_batched()
    assert_batch_same(model, compiled, eager, no_recompiles)



def test_compiled_decode_of_batches_equals_single_streams() -> None:
    model = random_tiny_model()
    _assert_batch_same(model, _engine(model, True), _engine(model, False))


def test_compile_decode_falls_back_to_eager_for_unsupported_models(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="compile_decode must be a bool"):
        EngineConfig(compile_decode="yes")
    cases = [(random_tiny_model().to(torch.bfloat16), None, "float32 or quantized"),
             (random_tiny_model(), torch.bfloat16, "float32 latent cache")]
    for model, cache_dtype, reason in cases:
        caplog.clear()
        config = EngineConfig(num_pages=8, max_model_len=64, compile_decode=True, dtype=cache_dtype)
        with caplog.at_level(logging.WARNING, logger="kimi_k2.engine.model_runner"):
            engine = LLMEngine(model, config=config)
        assert engine.runner.decoder is None
        assert "compiled decode off" in caplog.text and reason in caplog.text
        out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        assert len(out[0][0].token_ids) == 3


def test_failed_compile_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(CompiledDecoder, "warm_up", broken)
    with caplog.at_level(logging.WARNING, logger="kimi_k2.engine.model_runner"):
        engine = _engine(random_tiny_model(), True)
    assert engine.runner.decoder is None and "torch.compile failed: no C++ compiler" in caplog.text


def test_failed_batched_compile_leaves_batches_eager(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    model = random_tiny_model()
    monkeypatch.setattr(CompiledDecoder, "compile_batched", broken)
    compiled, eager = _engine(model, True), _engine(model, False)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    prompts = [[3, 4, 5], [6, 7]]
    with caplog.at_level(logging.WARNING, logger="kimi_k2.engine.compiled_decode"):
        first = compiled.generate(prompts, params)
        assert not compiled.runner.decoder.wait_batched()
    assert "compiled decode of batches off, batches run the eager model: torch.compile failed: out of memory" in \
        caplog.text
    assert [r[0].token_ids for r in first] == [r[0].token_ids for r in compiled.generate(prompts, params)] == \
        [r[0].token_ids for r in eager.generate(prompts, params)]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{"q_lora_rank": None, "attention_bias": True}, {"n_group": 2, "topk_group": 1}],
                         ids=["no-q-lora-bias", "grouped-router"])
def test_compiled_decode_variants(overrides: dict) -> None:
    model = random_tiny_model(**overrides)
    _assert_same(model, _engine(model, True), _engine(model, False), new=8)
