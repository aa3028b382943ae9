"""`EngineConfig(compile_decode=True, decode_backend="aoti")`: decode steps through the AOTInductor package of
`DecodeStep` give the eager engine's greedy tokens and logprobs, follow weight changes, and a second engine of the same
model shape loads the cached package (no build subprocess) in a process that never imports dynamo, inductor or triton.

The package of k2-tiny is built once for the module (a subprocess, ~1 CPU-minute) into a temporary cache; the
quantized variants (one build each) are `slow`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from engine_fixtures import PROMPT_LENGTHS, assert_batch_same
from model_fixtures import random_tiny_model

from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams, aot_decode
from kimi_k2.engine.aot_decode import AotDecoder
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.quantized import quantize_model


def _engine(model: K2ForCausalLM, aoti: bool, num_pages: int = 32) -> LLMEngine:
    config = EngineConfig(page_size=16, num_pages=num_pages, max_model_len=96, max_num_seqs=4,
                          enable_prefix_caching=False, compile_decode=aoti, decode_backend="aoti")
    return LLMEngine(model, config=config)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("aoti")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aot_decode, "cache_root", lambda: root)
        yield root


@pytest.fixture(scope="module")
def built(cache: Path) -> tuple[K2ForCausalLM, LLMEngine]:
    model = random_tiny_model()
    engine = _engine(model, True)
    decoder = engine.runner.decoder
    assert isinstance(decoder, AotDecoder) and decoder.build_seconds is not None  # built, not found
    assert [p.name for p in cache.iterdir()] == [f"decode-{aot_decode.package_key(decoder.job)}.pt2"]
    return model, engine


def _assert_same(model: K2ForCausalLM, aot: LLMEngine, eager: LLMEngine, new: int, atol: float = 1e-4) -> None:
    gen = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=5)
    for n in PROMPT_LENGTHS:
        prompt = torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist()
        a, b = aot.generate([prompt], params)[0][0], eager.generate([prompt], params)[0][0]
        assert a.token_ids == b.token_ids, f"prompt of {n} tokens"
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            torch.testing.assert_close(torch.tensor([v for _, v in x.top]), torch.tensor([v for _, v in y.top]),
                                       rtol=0, atol=atol)



def test_aot_decode_equals_eager_engine(built: tuple[K2ForCausalLM, LLMEngine]) -> None:
    model, aot = built
    eager = _engine(model, False)
    _assert_same(model, aot, eager, new=20)
    assert_batch_same(model, aot, eager)
    with torch.no_grad():  # in-place weight updates reach the package's inputs (packed experts, fused views) ...
        model.model.layers[1].mlp.experts[0].down_proj.weight.mul_(-1.5)
        model.model.layers[2].self_attn.kv_a_proj_with_mqa.weight.mul_(0.5)
        shared = model.model.layers[1].mlp.shared_experts.down_proj  # ... and so does a replaced tensor
        shared.weight = torch.nn.Parameter(shared.weight * -2.0)
    _assert_same(model, aot, eager, new=6)


def test_second_engine_loads_the_cached_package(built: tuple[K2ForCausalLM, LLMEngine],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build(*args, **kwargs):
        raise AssertionError(f"a build subprocess ran: {args}")

    monkeypatch.setattr(aot_decode.subprocess, "run", no_build)
    model = random_tiny_model()
    other = _engine(model, True, num_pages=40)  # another pool size: the same graph
    assert isinstance(other.runner.decoder, AotDecoder) and other.runner.decoder.build_seconds is None
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [[3, 4, 5], list(range(2, 30))]
    assert [r[0].token_ids for r in other.generate(prompts, params)] == \
        [r[0].token_ids for r in _engine(model, False).generate(prompts, params)]


FRESH_PROCESS = """
import json, sys
from pathlib import Path
import torch
from model_fixtures import random_tiny_model
from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams, aot_decode
aot_decode.cache_root = lambda: Path(sys.argv[1])
engine = LLMEngine(random_tiny_model(), config=EngineConfig(page_size=16, num_pages=32, max_model_len=96,
                   compile_decode=True, decode_backend="aoti"))
out = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
decoder = engine.runner.decoder
print(json.dumps({"aot": isinstance(decoder, aot_decode.AotDecoder), "built": decoder and decoder.build_seconds,
                  "tokens": out[0][0].token_ids, "imported": sorted(m for m in sys.modules if m.startswith(
                      ("torch._dynamo", "torch._inductor", "triton")))}))
"""


def test_aot_engine_process_loads_without_the_compiler_stack(built: tuple[K2ForCausalLM, LLMEngine],
                                                             cache: Path) -> None:
    """What the backend is for: the serving process runs the cached package without importing dynamo, inductor or
    triton (the in-process torch.compile path imports ~150 MiB of them)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(cache)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    eager = _engine(random_tiny_model(), False).generate([[3, 4, 5]], SamplingParams(max_tokens=8, temperature=0,
                                                                                      ignore_eos=True))
    assert got == {"aot": True, "built": None, "tokens": eager[0][0].token_ids, "imported": []}


def test_aot_decode_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="decode_backend must be 'inductor' or 'aoti'"):
        EngineConfig(decode_backend="aot")
    config = EngineConfig(num_pages=8, max_model_len=64, compile_decode=True, decode_backend="aoti",
                          dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="kimi_k2.engine.model_runner"):
        engine = LLMEngine(random_tiny_model(), config=config)
    assert engine.runner.decoder is None and "float32 latent cache" in caplog.text

    def broken(job: dict) -> None:
        raise RuntimeError("building the AOTInductor decode package failed: no C++ compiler")

    monkeypatch.setattr(aot_decode, "package", broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kimi_k2.engine.model_runner"):
        engine = _engine(random_tiny_model(), True)
    assert engine.runner.decoder is None and "AOTInductor decode off" in caplog.text and "no C++" in caplog.text
    out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0][0].token_ids) == 3


def test_cli_decode_backend_reaches_the_engine(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                              capsys: pytest.CaptureFixture) -> None:
    """`kimi-k2 generate --decode-backend aoti` asks the engine for the AOTInductor decode (here its build fails, so
    it decodes eagerly with a warning); with --no-compile it is a usage error."""
    from kimi_k2.cli import main

    def broken(job: dict) -> None:
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(aot_decode, "package", broken)
    with caplog.at_level(logging.WARNING, logger="kimi_k2.engine.model_runner"):
        assert main(["generate", "k2-tiny", "--ids", "3 4 5", "--max-tokens", "2", "--temperature", "0",
                     "--decode-backend", "aoti"]) == 0
    assert "AOTInductor decode off" in caplog.text and "no C++ compiler here" in caplog.text
    assert main(["generate", "k2-tiny", "--ids", "3 4 5", "--no-compile", "--decode-backend", "aoti"]) == 2
    assert "drop --no-compile" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_aot_decode_of_quantized_weights_equals_eager(cache: Path, fmt: str) -> None:
    """`--quantization int8|fp16`: the package calls `kimi_k2::linear_q8` / `linear_f16` through AOTInductor's proxy
    executor."""
    model = quantize_model(random_tiny_model(), fmt)
    aot, eager = _engine(model, True), _engine(model, False)
    assert isinstance(aot.runner.decoder, AotDecoder)
    # int8: Q8_0 activation rounding can differ in the last bit (see the compiled decode's test)
    _assert_same(model, aot, eager, new=10, atol=1e-4 if fmt == "fp16" else 2e-2)
    assert_batch_same(model, aot, eager)
