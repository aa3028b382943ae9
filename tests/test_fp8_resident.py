"""Block-FP8 weights kept FP8 (`FP8Linear`, `load_fp8_resident`): the module on each fp8_linear path (the Triton ones
under TRITON_INTERPRET=1 on the CPU) against dequantized fp32 math, and a whole model loaded FP8-resident against the
same checkpoint dequantized: same greedy tokens, logits within the FP8 GEMM's error, weight memory = the checkpoint's
FP8 bytes. Kernel modules decide interpreter or compiler at import, so TRITON_INTERPRET is set before any import."""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from kimi_k2.checkpoint import CheckpointReader  # noqa: E402
from kimi_k2.config import K2Config  # noqa: E402
from kimi_k2.engine import EngineConfig, LLMEngine  # noqa: E402
from kimi_k2.engine.loader import load_fp8_resident, load_model  # noqa: E402
from kimi_k2.engine.params import SamplingParams  # noqa: E402
from kimi_k2.model import K2ForCausalLM  # noqa: E402
from kimi_k2.ops.triton.fp8_module import FP8Linear  # noqa: E402
from kimi_k2.ops.triton.reference import fp8_linear_reference  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _interpreted_or_cuda() -> None:
    pytest.importorskip("triton")
    from kimi_k2.ops.triton import common, fp8_gemm

    if not HAS_CUDA and not common.interpreted(fp8_gemm._act_quant_kernel):
        pytest.skip("kernels were imported compiled before TRITON_INTERPRET=1 was set: run this file on its own")


@pytest.mark.parametrize("path", ["reference", "triton_w8a16", "triton_fp8"])
def test_fp8_linear_module_matches_dequantized_math(path):
    if path != "reference":
        _interpreted_or_cuda()
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 160, bias=False, device=DEVICE)
    m = FP8Linear.from_linear(dense, path)
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale_inv.shape == (2, 2)
    x = torch.randn(3, 5, 256, device=DEVICE)
    want = fp8_linear_reference(x, m.weight, m.weight_scale_inv, quantize_activations=path == "triton_fp8")
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    # and the FP8 weight is the float weight to e4m3 precision (2^-4 relative per element)
    torch.testing.assert_close(m(x), dense(x), rtol=0.1, atol=0.15)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"))
    out = tmp_path_factory.mktemp("fp8") / "ckpt"
    model.save_pretrained(out, fp8=True, max_shard_size=100_000)
    return out


def greedy(model, prompts, n=6):
    engine = LLMEngine(model, config=EngineConfig(num_pages=32, page_size=4, max_model_len=64))
    out = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, logprobs=3))
    return [r[0].token_ids for r in out], torch.tensor([[lp.logprob for lp in r[0].logprobs] for r in out])


def test_fp8_resident_model_keeps_fp8_bytes_and_greedy_tokens(checkpoint):
    reader = CheckpointReader(checkpoint)
    dense = load_model(str(checkpoint), torch.float32, device=DEVICE, fp8_resident=False)
    fp8 = load_model(str(checkpoint), torch.float32, device=DEVICE, fp8_resident=True)
    linears = {n: m for n, m in fp8.named_modules() if isinstance(m, FP8Linear)}
    stored = [n for n in reader if reader.is_fp8(n)]
    # every stored FP8 projection but kv_b_proj (read by the absorbed attention) stays FP8
    assert sorted(f"{n}.weight" for n in linears) == sorted(n for n in stored if "kv_b_proj" not in n)
    fp8_bytes = sum(m.weight.numel() + 4 * m.weight_scale_inv.numel() for m in linears.values())
    on_disk = sum(reader.info[n].end - reader.info[n].begin + reader.info[n + "_scale_inv"].end
                  - reader.info[n + "_scale_inv"].begin for n in (f"{k}.weight" for k in linears))
    assert fp8_bytes == on_disk
    prompts = [[5, 17, 99, 3, 250], [42, 7, 311]]
    (want_t, want_lp), (got_t, got_lp) = greedy(dense, prompts), greedy(fp8, prompts)
    assert got_t == want_t
    torch.testing.assert_close(got_lp, want_lp, rtol=0, atol=1e-4)  # reference path: the same dequantized math


def test_fp8_resident_through_the_weight_only_kernel(checkpoint):
    _interpreted_or_cuda()
    dense = load_model(str(checkpoint), torch.float32, device=DEVICE, fp8_resident=False)
    fp8 = load_fp8_resident(str(checkpoint), torch.float32, DEVICE, path="triton_w8a16")
    ids = torch.tensor([[5, 17, 99, 3, 250]], device=DEVICE)
    with torch.inference_mode():
        torch.testing.assert_close(fp8(ids), dense(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_fp8_resident_on_cuda_by_default_and_close_to_fp32(checkpoint):
    model = load_model(str(checkpoint), torch.bfloat16, device="cuda")
    assert any(isinstance(m, FP8Linear) for m in model.modules())
    dense = load_model(str(checkpoint), torch.float32, device="cpu")
    ids = [[5, 17, 99, 3, 250]]
    with torch.inference_mode():
        got = model(torch.tensor(ids, device="cuda")).float().cpu()
        want = dense(torch.tensor(ids))
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # bf16 activations, FP8 GEMM with 1x128 act quant
