"""K2ForCausalLM: checkpoint names and shapes, meta construction, init, input checks, save/load round trip."""

from __future__ import annotations

import pytest
import torch

from kimi_k2.checkpoint import dequantize_block_fp8, is_quantized_name, quantize_block_fp8
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM, K2Model


def test_kimi_k2_names_and_shapes_equal_the_published_checkpoint() -> None:
    """kimi_k2_formats.md §1.5: tensor names and shapes of Kimi-K2-Instruct (61 layers cut to 3), on the meta device."""
    config = K2Config.from_preset("kimi-k2-instruct").replace(num_hidden_layers=3)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    sd = model.state_dict()
    assert all(t.is_meta for t in sd.values())
    att = "model.layers.2.self_attn."
    expected = {
        "model.embed_tokens.weight": (163840, 7168), "lm_head.weight": (163840, 7168), "model.norm.weight": (7168,),
        "model.layers.2.input_layernorm.weight": (7168,), "model.layers.2.post_attention_layernorm.weight": (7168,),
        att + "q_a_proj.weight": (1536, 7168), att + "q_a_layernorm.weight": (1536,),
        att + "q_b_proj.weight": (12288, 1536), att + "kv_a_proj_with_mqa.weight": (576, 7168),
        att + "kv_a_layernorm.weight": (512,), att + "kv_b_proj.weight": (16384, 512),
        att + "o_proj.weight": (7168, 8192),
        "model.layers.0.mlp.gate_proj.weight": (18432, 7168), "model.layers.0.mlp.up_proj.weight": (18432, 7168),
        "model.layers.0.mlp.down_proj.weight": (7168, 18432),
        "model.layers.2.mlp.experts.383.gate_proj.weight": (2048, 7168),
        "model.layers.2.mlp.experts.383.down_proj.weight": (7168, 2048),
        "model.layers.1.mlp.shared_experts.up_proj.weight": (2048, 7168),
        "model.layers.1.mlp.gate.weight": (384, 7168), "model.layers.1.mlp.gate.e_score_correction_bias": (384,),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    attn = {"q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"}
    per_layer = 2 + len(attn)
    moe_layer = per_layer + 2 + 3 * 384 + 3
    assert len(sd) == 3 + (per_layer + 3) + 2 * moe_layer  # embed, norm, lm_head; dense layer 0; 2 MoE layers
    assert {n.rsplit(".", 1)[-1] for n, _ in model.named_buffers()} == {"e_score_correction_bias"}


def test_q_proj_without_q_lora_and_no_extra_tensors() -> None:
    config = K2Config.from_preset("k2-tiny").replace(q_lora_rank=None)
    with torch.device("meta"):
        sd = K2ForCausalLM(config).state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in sd
    assert not any("q_a_proj" in n or "q_b_proj" in n or "rotary" in n or "inv_freq" in n for n in sd)


def test_from_config_initialization_and_dtype() -> None:
    config = K2Config.from_preset("k2-tiny").replace(initializer_range=0.05)
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(config, torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0
    assert model.model.norm.weight.float().eq(1).all()
    assert model.model.layers[0].self_attn.kv_a_layernorm.weight.float().eq(1).all()
    w = model.model.layers[1].mlp.experts[3].up_proj.weight.float()
    assert abs(w.std().item() - 0.05) < 0.005 and abs(w.mean().item()) < 0.005
    ids = torch.randint(0, config.vocab_size, (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, config.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert K2ForCausalLM.from_config(config).lm_head.weight.dtype == torch.float32  # config.torch_dtype


def test_causal_and_engine_access_to_hidden_and_lm_head() -> None:
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny")).eval()
    assert isinstance(model.model, K2Model)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        logits = model(ids)
        prefix = model(ids[:, :7])
        hidden = model.model(ids)
    torch.testing.assert_close(prefix, logits[:, :7], atol=1e-5, rtol=1e-5)  # causal: the future does not leak
    torch.testing.assert_close(model.lm_head(hidden[:, -1]).float(), logits[:, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "ids, positions, match",
    [
        (torch.zeros(4, dtype=torch.long), None, "input_ids"),
        (torch.zeros(1, 4), None, "input_ids"),
        (torch.tensor([[1, 512]]), None, "out of range"),
        (torch.tensor([[-1, 2]]), None, "out of range"),
        (torch.zeros(1, 4, dtype=torch.long), torch.arange(3)[None], "positions"),
    ],
)
def test_bad_input_is_a_clear_error(ids: torch.Tensor, positions: torch.Tensor | None, match: str) -> None:
    model = K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"))
    with pytest.raises(ValueError, match=match):
        model(ids, positions)


@pytest.mark.parametrize("fp8", [False, True])
def test_save_pretrained_then_from_pretrained(tmp_path, fp8: bool) -> None:
    torch.manual_seed(0)
    config = K2Config.from_preset("k2-tiny").replace(hidden_size=160, q_lora_rank=128, kv_lora_rank=128)
    model = K2ForCausalLM.from_config(config, torch.bfloat16).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    model.save_pretrained(tmp_path, fp8=fp8)
    loaded = K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert not loaded.training
    assert set(loaded.state_dict()) == set(model.state_dict())
    if fp8:  # what the checkpoint holds: every projection through 128x128 block-FP8 and back
        with torch.no_grad():
            for name, p in model.named_parameters():
                if is_quantized_name(name):
                    p.copy_(dequantize_block_fp8(*quantize_block_fp8(p), dtype=torch.bfloat16))
    for name, t in model.state_dict().items():
        assert loaded.state_dict()[name].dtype == t.dtype, name
        assert torch.equal(loaded.state_dict()[name], t), name
    ids = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


def test_tied_embeddings_are_rejected() -> None:
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        K2ForCausalLM(K2Config.from_preset("k2-tiny").replace(tie_word_embeddings=True))
