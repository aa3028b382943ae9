"""The engine's decode steps through the paged Triton MLA kernel (`EngineConfig(attention_backend="triton")`, the
default on CUDA) generate what the PyTorch path does. Without CUDA the kernel runs on CPU tensors under Triton's
interpreter, which must be chosen before the kernel module is imported: TRITON_INTERPRET is set before any import."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from kimi_k2.config import K2Config  # noqa: E402
from kimi_k2.engine import EngineConfig, LLMEngine  # noqa: E402
from kimi_k2.engine.paged_cache import LatentPool, PagedLatentCache, Row, default_attention  # noqa: E402
from kimi_k2.engine.params import SamplingParams  # noqa: E402
from kimi_k2.model import K2ForCausalLM  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
PROMPTS = [[5, 17, 99, 3, 250, 7, 7], [42, 7, 311], [1] * 11]


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("triton")
    import triton.language as tl

    from kimi_k2.ops.triton import common, mla_decode

    # triton.language's own jit functions (tl.cdiv) too: torch.compile's dynamic shapes import it (inductor)
    if not HAS_CUDA and not (common.interpreted(mla_decode._split_kernel) and common.interpreted(tl.cdiv)):
        pytest.skip("kernels were imported compiled before TRITON_INTERPRET=1 was set: run this file on its own")
    torch.manual_seed(0)
    return K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"), torch.float32).to(DEVICE).eval()


def generate(model, backend):
    config = EngineConfig(num_pages=32, page_size=4, max_model_len=64, attention_backend=backend)
    engine = LLMEngine(model, config=config)
    assert engine.pool.attention == backend
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))
    return [r[0].token_ids for r in out], torch.tensor([[lp.logprob for lp in r[0].logprobs] for r in out])


def test_triton_decode_generates_what_the_torch_path_does(model):
    want_tokens, want_lp = generate(model, "torch")
    got_tokens, got_lp = generate(model, "triton")
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-4)


def test_decode_steps_use_the_kernel_and_prefill_does_not(model):
    pool = LatentPool(model.config, 8, 4, torch.float32, DEVICE, "triton")
    decode = PagedLatentCache(pool, [Row([3], 5, [2, 1], True), Row([4], 1, [0], True)])
    assert decode.attend is not None and decode.context_lens.tolist() == [6, 2]
    prefill = PagedLatentCache(pool, [Row([3, 4], 0, [2], True)])
    assert not hasattr(prefill, "attend") and prefill.mask is not None
    assert default_attention(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="attention backend"):
        LatentPool(model.config, 8, 4, torch.float32, DEVICE, "flash")
