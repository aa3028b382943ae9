"""The closed-form checkpoint layout of a config (`expected_shapes`) is the model's own state dict, name for name."""

from __future__ import annotations

import pytest
import torch

from kimi_k2.checkpoint import CheckpointError, CheckpointReader, save_state_dict
from kimi_k2.checkpoint.layout import check_layout, expected_shapes
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM

TINY = K2Config.from_preset("k2-tiny")
CONFIGS = {
    "k2-tiny": TINY,
    "k2-nano": K2Config.from_preset("k2-nano"),
    # no q bottleneck, attention biases, no shared-expert count, MoE every other layer, dense model
    "variants": TINY.replace(q_lora_rank=None, attention_bias=True, n_shared_experts=None, moe_layer_freq=2,
                             num_hidden_layers=5),
    "dense": TINY.replace(n_routed_experts=None, num_experts_per_tok=None),
    # the published Kimi K2 shapes (384 experts, 64 heads, 7168 wide), three of its 61 layers
    "kimi-k2": K2Config.from_preset("kimi-k2-instruct").replace(num_hidden_layers=3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_expected_shapes_are_the_models_state_dict(name):
    config = CONFIGS[name]
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(config) == got


def test_check_layout_names_missing_unexpected_and_misshapen_tensors(tmp_path):
    state = K2ForCausalLM.from_config(TINY).state_dict()
    save_state_dict(state, tmp_path / "ok", TINY)
    check_layout(CheckpointReader(tmp_path / "ok"), TINY)
    gone = "model.layers.2.mlp.experts.5.down_proj.weight"
    save_state_dict({k: v for k, v in state.items() if k != gone}, tmp_path / "missing", TINY)
    with pytest.raises(CheckpointError, match=rf"lacks 1 tensors its config.json implies: \['{gone}'\]"):
        check_layout(CheckpointReader(tmp_path / "missing"), TINY)
    save_state_dict({**state, "model.layers.3.input_layernorm.weight": state["model.norm.weight"]}, tmp_path / "extra",
                    TINY)
    with pytest.raises(CheckpointError, match=r"1 tensors its config.json does not imply: \['model.layers.3"):
        check_layout(CheckpointReader(tmp_path / "extra"), TINY)
    bad = "model.layers.0.self_attn.kv_b_proj.weight"
    save_state_dict({**state, bad: state[bad][:, :8]}, tmp_path / "shape", TINY)
    with pytest.raises(CheckpointError, match=rf"1 tensors disagree with its config.json: \['{bad} \(128, 8\) "
                                              rf"\(config: \(128, 32\)\)'\]"):
        check_layout(CheckpointReader(tmp_path / "shape"), TINY)
