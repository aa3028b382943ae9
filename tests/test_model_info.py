"""`kimi-k2 info` and model_info: counts from a meta-device model, checked against real tensors and K2's figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kimi_k2.cli import main
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.info import model_info


def _stored_bytes(directory: Path) -> int:
    total = 0
    for f in directory.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():
                t = st.get_slice(name)
                total += int(torch.tensor(t.get_shape()).prod()) * {"F8_E4M3": 1, "BF16": 2, "F32": 4}[t.get_dtype()]
    return total


def test_kimi_k2_instruct_is_1t_total_32b_activated() -> None:
    info = model_info(K2Config.from_preset("kimi-k2-instruct"))
    assert 1.02e12 < info.total_params < 1.04e12  # README: 1T total
    assert 31e9 < info.activated_params < 34e9  # README: 32B activated
    # kimi_k2_formats.md §1.5: 1,026,470,731,056 tensor elements on disk, fp32 scale tensors included
    assert info.total_params == pytest.approx(1_026_470_731_056, rel=1e-4)
    assert info.fp8_bytes == pytest.approx(958.51 * 2**30, rel=1e-3)  # 958.51 "GB" on disk
    assert info.kv_bytes_per_token == 70_272 and info.naive_kv_bytes_per_token == 2_498_560  # serving_anchors §2
    assert info.kv_ratio == pytest.approx(35.56, abs=0.01)
    assert info.components["routed_experts"] == 60 * 384 * 3 * 7168 * 2048


def test_tiny_counts_equal_the_real_tensors(tmp_path: Path) -> None:
    config = K2Config.from_preset("k2-tiny")
    info = model_info(config)
    model = K2ForCausalLM.from_config(config, torch.bfloat16)
    sd = model.state_dict()
    assert info.total_params == sum(t.numel() for t in sd.values())
    assert sum(info.components.values()) == info.total_params
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    n_moe = config.num_hidden_layers - config.first_k_dense_replace
    assert info.activated_params == info.total_params - n_moe * (8 - 2) * expert  # 2 of 8 experts per token
    assert info.components["router"] == n_moe * 8 * (config.hidden_size + 1)
    model.save_pretrained(tmp_path / "bf16")
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    assert info.bf16_bytes == _stored_bytes(tmp_path / "bf16")
    assert info.fp8_bytes == _stored_bytes(tmp_path / "fp8")
    assert model_info(K2ForCausalLM.from_pretrained(tmp_path / "fp8").config) == info


def test_info_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["info", "k2-tiny"]) == 0
    out = capsys.readouterr().out
    assert "activated" in out and "routed_experts" in out and "ratio 4.0x" in out
    K2Config.from_preset("k2-small").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    assert '"total_params"' in capsys.readouterr().out
    assert main(["info", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
