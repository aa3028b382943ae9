"""The GPU benchmark (benchmarks/gpu): its roofline arithmetic, and a CPU dry run of the whole driver so the script is
tested before it meets a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kimi_k2.checkpoint.fp8 import is_quantized_name
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gpu import roofline  # noqa: E402


def _bytes_read_by_one_token(config: K2Config, precision: str) -> int:
    """Counted tensor by tensor on a meta model: one embedding row, k of the E routed experts of each MoE layer,
    every other tensor whole; projections 1 byte + 4 per 128x128 block in fp8, everything 2 bytes in bf16 (the fp32
    router bias 4)."""
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    total = 0.0
    for name, t in model.state_dict().items():
        if name.endswith("e_score_correction_bias"):
            b = t.numel() * 4
        elif precision == "fp8" and is_quantized_name(name):
            b = t.numel() + math.ceil(t.shape[0] / 128) * math.ceil(t.shape[1] / 128) * 4
        else:
            b = t.numel() * 2
        if name.startswith("model.embed_tokens."):
            b = config.hidden_size * 2
        elif ".mlp.experts." in name:
            b = b * config.num_experts_per_tok / config.n_routed_experts
        total += b
    return total


@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_roofline_counts_the_bytes_one_token_reads(precision: str) -> None:
    config = K2Config.from_preset("k2-tiny")
    row = roofline.step_bytes(config, batch=1, context=100, precision=precision)
    assert row["weight_bytes"] == pytest.approx(_bytes_read_by_one_token(config, precision), rel=1e-12)
    assert row["kv_bytes"] == 100 * (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * 2
    assert row["tok_s"] == pytest.approx(roofline.H200_HBM_BYTES_PER_S / (row["weight_bytes"] + row["kv_bytes"]))


def test_roofline_batch_reads_shared_weights_once() -> None:
    config = K2Config.from_preset("k2-tiny")  # 8 experts, 2 per token
    one, many = (roofline.step_bytes(config, b, 0, "bf16") for b in (1, 10_000))
    assert roofline.experts_touched(8, 2, 1) == 2 and roofline.experts_touched(8, 2, 10_000) == pytest.approx(8)
    # a huge batch reads every expert once: the weights of the whole model (but one embedding row per sequence)
    per_expert = (one["weight_bytes"] - roofline.step_bytes(config.replace(num_experts_per_tok=1), 1, 0,
                                                            "bf16")["weight_bytes"])
    assert many["weight_bytes"] == pytest.approx(one["weight_bytes"] + 6 * per_expert + 9_999 * 64 * 2)
    assert many["tok_s"] > 1000 * one["tok_s"]
    with pytest.raises(ValueError, match="precision must be one of"):
        roofline.step_bytes(config, 1, 0, "int4")


@pytest.mark.slow  # builds the 1 T-parameter model on the meta device: ~15 CPU-s
def test_roofline_of_kimi_k2_reads_its_32b_active_parameters_mostly_as_fp8() -> None:
    # K2: 32 B activated parameters per token (model card), projections in FP8, embedding/lm_head in bf16
    row = roofline.step_bytes(K2Config.from_preset("kimi-k2-instruct"), batch=1, context=0, precision="fp8")
    assert 31e9 < row["weight_bytes"] < 36e9
    assert 130 < row["tok_s"] < 160  # 4.8 TB/s over ~33 GB


def test_run_sh_is_valid_bash() -> None:
    out = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu" / "run.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_dry_run_measures_every_section_and_writes_the_results(tmp_path: Path) -> None:
    pytest.importorskip("triton", reason="the dry run runs the Triton kernels under the interpreter")
    pytest.importorskip("transformers", reason="the dry run runs HF generate()")
    out = tmp_path / "dry.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "driver.py"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "dry-run" and res["env"]["triton_interpret"] == "1"
    assert {(r["precision"], r["batch"]) for r in res["roofline"]} == {(p, b) for p in ("fp8", "bf16") for b in (1, 4)}
    impls = {(r["kernel"], r["impl"]) for r in res["kernels"]}
    assert impls == {("mla_decode", "triton"), ("mla_decode", "reference"), ("mla_decode", "sdpa_contiguous"),
                     ("fp8_gemm", "triton_fp8"), ("fp8_gemm", "triton_w8a16"), ("fp8_gemm", "bfloat16_matmul"),
                     ("fp8_gemm", "reference")}
    for r in res["kernels"]:
        assert r["ms"] > 0
        if r["impl"] in ("triton", "triton_fp8", "reference"):  # the same numerics as the reference (bf16 output)
            assert r["max_err"] < 0.05, r
    [hf] = res["hf_generate"]
    assert hf["new_tokens"] == 6 and hf["decode_tok_s"] > 0
    assert [r["batch"] for r in res["engine_decode"]] == [1, 4]
    assert all(r["decode_tok_s"] > 0 and 0 < r["roofline_fraction"] for r in res["engine_decode"])
    [fp8] = res["engine_decode_fp8"]
    assert fp8["decode_tok_s"] > 0 and fp8["weights_GB"] < res["engine_decode"][0]["weights_GB"]
    parity = {r["engine"]: r for r in res["parity"]}
    exact = parity["kimi_k2 bf16 (fp32 activations)"]  # fp32 on the CPU: HF's greedy tokens exactly
    assert exact["equal_prefix"] == exact["tokens"] == 16 and exact["max_logit_err"] < 1e-4
    assert parity["kimi_k2 fp8 (fp32 activations)"]["max_logit_err"] < 0.5 * exact["logit_scale"]
    assert res["targets"]["fp8_weight_memory_over_fp8_checkpoint (~1; kv_b_proj stays bf16)"] is not None
    assert "## engine_decode" in proc.stdout and "## parity" in proc.stdout
