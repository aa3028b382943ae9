import json

import pytest

from kimi_k2.config import KIMI_K2_INSTRUCT, PRESETS, K2Config


def test_published_config_round_trips_key_for_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K2_INSTRUCT))
    cfg = K2Config.from_pretrained(tmp_path)
    assert cfg.to_dict() == dict(sorted(KIMI_K2_INSTRUCT.items()))
    assert cfg.is_fp8 and cfg.weight_block_size == (128, 128)
    assert cfg.extra["auto_map"]["AutoConfig"] == "configuration_deepseek.DeepseekV3Config"


def test_0905_is_256k():
    cfg = K2Config.from_preset("kimi-k2-instruct-0905")
    assert cfg.rope_scaling["factor"] == 64.0
    assert cfg.max_position_embeddings == 262144 == 4096 * 64


def test_rope_parameters_spelling_is_read():
    raw = dict(KIMI_K2_INSTRUCT)
    raw.pop("rope_scaling")
    raw.pop("rope_theta")
    raw["model_type"] = "deepseek_v3"
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                              "original_max_position_embeddings": 4096, "beta_fast": 1.0, "beta_slow": 1.0,
                              "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = K2Config.from_dict(raw)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 32.0
    default = K2Config.from_dict({**raw, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert default.rope_scaling is None and default.rope_theta == 1e4


def test_softmax_scale_has_yarn_mscale_squared():
    cfg = K2Config.from_preset("kimi-k2-instruct")
    m = 0.1 * 1.0 * __import__("math").log(32.0) + 1.0
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"model_type": "llama"}, "unknown model_type"),
        ({"n_group": 5}, "divisible by n_group"),
        ({"topk_group": 3, "n_group": 2}, "topk_group"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
    ],
)
def test_bad_configs_name_the_problem(change, words):
    with pytest.raises(ValueError, match=words):
        K2Config.from_dict({**PRESETS["k2-tiny"], **change})


def test_missing_model_type_and_unknown_preset():
    with pytest.raises(ValueError, match="model_type"):
        K2Config.from_dict({"hidden_size": 8})
    with pytest.raises(KeyError, match="unknown preset"):
        K2Config.from_preset("kimi-k3")
    with pytest.raises(FileNotFoundError, match="not a preset"):
        K2Config.from_pretrained("/nonexistent/dir")


def test_moe_layer_rule():
    cfg = K2Config.from_preset("kimi-k2-instruct")
    assert not cfg.is_moe_layer(0) and all(cfg.is_moe_layer(i) for i in range(1, 61))
