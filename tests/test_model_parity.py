"""Parity with transformers==4.57.6 DeepseekV3ForCausalLM (random weights, fp32 logits within 1e-4).

The HF model is saved with its own save_pretrained and loaded with K2ForCausalLM.from_pretrained, so names, shapes
and the checkpoint path are covered too. Where transformers differs from the DeepSeek reference (groups dropped by
group-limited routing are masked with 0 instead of -inf), the bias is kept positive here so both agree; the negative
bias case is checked against a direct computation in test_model_moe.py.
"""

from __future__ import annotations

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

CASES = {
    # K2 shape: q_lora, one group, beta_fast = beta_slow = 1, sequence past original_max_position_embeddings
    "k2-tiny": ({}, 300),
    "no-q-lora-factor32": (
        {"q_lora_rank": None, "rope_scaling": {**YARN, "factor": 32.0, "original_max_position_embeddings": 64,
                                               "beta_fast": 32.0}},
        150,
    ),
    "groups-factor8-mscale": (
        {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 2,
         "num_hidden_layers": 4, "rope_theta": 10000.0,
         "rope_scaling": {**YARN, "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
                          "mscale": 0.9, "mscale_all_dim": 0.6}},
        80,
    ),
    "no-yarn-unnormalized": ({"rope_scaling": None, "norm_topk_prob": False, "routed_scaling_factor": 1.5}, 40),
    "bias-all-moe-2-shared": ({"attention_bias": True, "first_k_dense_replace": 0, "n_shared_experts": 2}, 40),
}


def _hf_pair(overrides: dict, tmp_path) -> tuple[torch.nn.Module, K2ForCausalLM]:
    config = K2Config.from_preset("k2-tiny").replace(**overrides)
    d = config.to_dict()
    d["model_type"] = "deepseek_v3"
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**d)).eval()
    with torch.no_grad():  # weights large enough that routing, rope and every norm matter
        for name, t in hf.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                t.uniform_(0.0, 0.5)  # non-zero, positive: HF's 0-masking and the reference's -inf agree
            elif name.endswith("norm.weight"):
                t.uniform_(0.5, 1.5)
            elif t.is_floating_point() and t.ndim == 2:
                t.normal_(0.0, 1.5 / t.shape[1] ** 0.5)
            elif name.endswith(".bias"):
                t.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    ours = K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    return hf, ours


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str, tmp_path) -> None:
    overrides, seq_len = CASES[case]
    hf, ours = _hf_pair(overrides, tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits.float()
        got = ours(ids)
    assert got.shape == expected.shape == (2, seq_len, ours.config.vocab_size)
    assert expected.abs().max() > 1.0  # the comparison is not trivially small
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_positions_argument_matches_transformers_position_ids(tmp_path) -> None:
    hf, ours = _hf_pair({}, tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    pos = (500 + 37 * torch.arange(20)).expand(2, 20)  # gapped, far past original_max_position_embeddings = 256
    with torch.no_grad():
        expected = hf(ids, position_ids=pos).logits.float()
        got = ours(ids, positions=pos)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        assert (ours(ids) - got).abs().max() > 1e-2  # relative distances changed, so must the logits


def test_parameter_names_equal_transformers(tmp_path) -> None:
    hf, ours = _hf_pair({"q_lora_rank": None}, tmp_path)
    assert set(ours.state_dict()) == set(hf.state_dict()) - {n for n in hf.state_dict() if "rotary_emb" in n}


@pytest.mark.slow
def test_k2_small_logits_match_transformers_past_original_context(tmp_path) -> None:
    """The benchmark shape (k2-small) at 1100 tokens, past its original_max_position_embeddings of 1024."""
    hf, ours = _hf_pair(K2Config.from_preset("k2-small").to_dict(), tmp_path)
    ids = torch.randint(0, ours.config.vocab_size, (1, 1100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits.float(), atol=1e-4, rtol=0)
