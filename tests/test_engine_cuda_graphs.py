"""Decode steps through per-bucket static buffers (`kimi_k2.engine.cuda_graphs`): the buckets, the padding, and an
engine whose decode steps run the padded static-buffer forward generating what the plain engine does. On the CPU
that forward runs eagerly with the Triton decode kernel interpreted (TRITON_INTERPRET is set before any import);
the capture and replay themselves are the `gpu` test."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from kimi_k2.config import K2Config  # noqa: E402
from kimi_k2.engine import EngineConfig, LLMEngine  # noqa: E402
from kimi_k2.engine.cuda_graphs import DecodeInputs, bucket_for, capture_sizes  # noqa: E402
from kimi_k2.engine.paged_cache import Row  # noqa: E402
from kimi_k2.engine.params import SamplingParams  # noqa: E402
from kimi_k2.model import K2ForCausalLM  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 250, 7, 7], [42, 7, 311], [1] * 11]
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def test_capture_sizes_and_buckets():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    sizes = capture_sizes(20)
    assert [bucket_for(n, sizes) for n in (1, 3, 4, 5, 17, 20, 21, 0)] == [1, 4, 4, 8, 20, 20, None, None]
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_decode_inputs_pad_onto_the_scratch_page():
    inputs = DecodeInputs(max_batch=4, max_pages=3, page_size=4, scratch_page=9, device=torch.device("cpu"))
    inputs.fill([Row([11], 5, [2, 6], True), Row([12], 0, [3], True)], bucket=4)
    assert inputs.input_ids[:, 0].tolist() == [11, 12, 0, 0]
    assert inputs.positions[:, 0].tolist() == [5, 0, 0, 0]
    assert inputs.write_slots.tolist() == [6 * 4 + 1, 3 * 4, 36, 36]  # padding rows write to the scratch page
    assert inputs.block_tables.tolist() == [[2, 6, 9], [3, 9, 9], [9, 9, 9], [9, 9, 9]]
    assert inputs.context_lens.tolist() == [6, 1, 1, 1]
    with pytest.raises(ValueError, match="fit the bucket"):
        inputs.fill([Row([1, 2], 0, [0], True)], bucket=4)
    with pytest.raises(ValueError, match="past the 3 pages"):
        inputs.fill([Row([1], 12, [0, 1, 2, 3], True)], bucket=1)


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("triton")
    import triton.language as tl

    from kimi_k2.ops.triton import common, mla_decode

    # triton.language's own jit functions (tl.cdiv) too: torch.compile's dynamic shapes import it (inductor)
    if not HAS_CUDA and not (common.interpreted(mla_decode._split_kernel) and common.interpreted(tl.cdiv)):
        pytest.skip("kernels were imported compiled before TRITON_INTERPRET=1 was set: run this file on its own")
    torch.manual_seed(0)
    # CUDA: bf16, what the grouped expert GEMM (torch._grouped_mm) runs there
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    return K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"), dtype).to(DEVICE).eval()


def generate(model, graphs):
    # CPU: the static-buffer step (interpreted Triton decode) against the plain torch path; CUDA: replayed graphs
    # against eager steps of the same kernels
    backend = "torch" if graphs is False and not HAS_CUDA else None
    config = EngineConfig(num_pages=32, page_size=4, max_model_len=64, max_num_seqs=6, cuda_graphs=graphs,
                          attention_backend=backend)
    engine = LLMEngine(model, config=config)
    if graphs:
        assert engine.runner.graphs is not None and engine.pool.num_pages == engine.block_manager.num_pages + 1
    out = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3))
    return [r[0].token_ids for r in out], torch.tensor([[lp.logprob for lp in r[0].logprobs] for r in out])


def test_bucketed_static_decode_generates_what_the_eager_engine_does(model):
    want_tokens, want_lp = generate(model, False)
    got_tokens, got_lp = generate(model, True)  # 3 rows padded to the bucket of 4; on CUDA, replayed graphs
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_graphs_are_captured_per_bucket_on_cuda(model):
    engine = LLMEngine(model, config=EngineConfig(num_pages=32, page_size=4, max_model_len=64, max_num_seqs=6))
    assert engine.runner.graphs is not None and sorted(engine.runner.graphs.graphs) == [1, 2, 4, 6]
