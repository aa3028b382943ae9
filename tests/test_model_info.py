"""`kimi-k2 info` and model_info: closed-form counts, checked against a meta-device model, real tensors and K2's
published figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kimi_k2.checkpoint.fp8 import is_quantized_name
from kimi_k2.cli import main
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.info import COMPONENTS, model_info

TINY = K2Config.from_preset("k2-tiny")
# presets and the edges of the closed form: no q-LoRA, attention biases (with and without q-LoRA), two shared experts,
# no dense layer / several dense layers / MoE every other layer / no MoE at all, sizes that leave partial FP8 blocks
# (and a non-default block size), grouped routing
CONFIGS = {
    "k2-tiny": TINY,
    "k2-small": K2Config.from_preset("k2-small"),
    "k2-nano": K2Config.from_preset("k2-nano"),
    "no-q-lora": TINY.replace(q_lora_rank=None),
    "attention-bias": TINY.replace(attention_bias=True),
    "attention-bias-no-q-lora": TINY.replace(attention_bias=True, q_lora_rank=None),
    "two-shared-experts": TINY.replace(n_shared_experts=2),
    "all-moe": TINY.replace(first_k_dense_replace=0),
    "two-dense-layers": TINY.replace(first_k_dense_replace=2, num_hidden_layers=4),
    "moe-every-other-layer": TINY.replace(moe_layer_freq=2, num_hidden_layers=5),
    "dense-only": TINY.replace(n_routed_experts=None, num_experts_per_tok=None),
    "odd-sizes": TINY.replace(vocab_size=1001, hidden_size=300, intermediate_size=259, moe_intermediate_size=130,
                              q_lora_rank=129, kv_lora_rank=200, qk_nope_head_dim=24, qk_rope_head_dim=10,
                              v_head_dim=20, num_attention_heads=5),
    "odd-block": TINY.replace(hidden_size=200, quantization_config={"quant_method": "fp8", "fmt": "e4m3",
                                                                    "weight_block_size": [64, 48]}),
    "grouped-routing": TINY.replace(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
}


def _component(name: str) -> str:
    if name.startswith("model.embed_tokens."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.endswith("norm.weight"):
        return "norms"
    for part, component in ((".mlp.experts.", "routed_experts"), (".mlp.shared_experts.", "shared_experts"),
                            (".mlp.gate.", "router"), (".self_attn.", "attention"), (".mlp.", "dense_mlp")):
        if part in name:
            return component
    raise AssertionError(f"cannot classify checkpoint tensor {name!r}")


def _meta_count(config: K2Config) -> tuple[dict[str, int], dict[str, int], dict[str, int], int]:
    """Per component: parameters, bf16 bytes and block-FP8 bytes of the model itself (built on the meta device),
    and its activated parameters (a token's top-k experts of the routed ones)."""
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    params, bf16, fp8 = (dict.fromkeys(COMPONENTS, 0) for _ in range(3))
    bm, bn = config.weight_block_size
    unused = 0
    for name, t in model.state_dict().items():
        n, part = t.numel(), _component(name)
        params[part] += n
        stored = n * (4 if name.endswith("e_score_correction_bias") else 2)
        bf16[part] += stored
        fp8[part] += n + math.ceil(t.shape[0] / bm) * math.ceil(t.shape[1] / bn) * 4 if is_quantized_name(name) \
            else stored
        if part == "routed_experts" and int(name.split(".mlp.experts.")[1].split(".")[0]) >= \
                config.num_experts_per_tok:
            unused += n  # any n_routed_experts - top_k experts of a layer have the same size
    return params, bf16, fp8, sum(params.values()) - unused


@pytest.mark.parametrize("name", CONFIGS)
def test_closed_form_counts_equal_the_meta_device_model(name: str) -> None:
    config = CONFIGS[name]
    info = model_info(config)
    params, bf16, fp8, activated = _meta_count(config)
    assert info.components == params
    assert info.bf16_component_bytes == bf16 and info.fp8_component_bytes == fp8
    assert info.total_params == sum(params.values()) and info.activated_params == activated
    assert info.bf16_bytes == sum(bf16.values()) and info.fp8_bytes == sum(fp8.values())


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
    assert round(info.total_params / 1e9, 1) == 1026.4 and round(info.activated_params / 1e9, 1) == 32.9
    # kimi_k2_formats.md §1.5: 1,026,470,731,056 tensor elements on disk, fp32 scale tensors included
    assert info.total_params == pytest.approx(1_026_470_731_056, rel=1e-4)
    assert round(info.fp8_bytes / 2**30, 2) == 958.49  # 958.51 "GB" (GiB, as du prints) on disk
    assert info.fp8_bytes == pytest.approx(958.51 * 2**30, rel=1e-3)
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
    assert main(["info", "--model", str(tmp_path), "--json"]) == 0
    assert '"total_params"' in capsys.readouterr().out
    assert main(["info", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kimi-k2 info: error:") and "no-such-model" in err and "k2-tiny" in err
