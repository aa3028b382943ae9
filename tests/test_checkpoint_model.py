"""End to end with the real model: K2ForCausalLM -> save_pretrained (bf16 / fp8) -> from_pretrained -> same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kimi_k2.checkpoint import CheckpointError, quantize_block_fp8
from kimi_k2.config import K2Config

model_mod = pytest.importorskip("kimi_k2.model")
K2ForCausalLM = model_mod.K2ForCausalLM

# what transformers 4.57 `FineGrainedFP8Config(weight_block_size=(128, 128)).to_dict()` writes into config.json
HF_FP8 = {"quant_method": "fp8", "modules_to_not_convert": None, "activation_scheme": "dynamic",
          "weight_block_size": [128, 128]}


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    config = K2Config.from_preset("k2-tiny")
    model = K2ForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # a non-zero router bias, so a dropped/misplaced fp32 bias changes expert choice
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids)
    return model, ids, logits


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def test_save_load_exact(tiny: tuple, tmp_path: Path) -> None:
    model, ids, logits = tiny
    model.save_pretrained(tmp_path, max_shard_size=64 * 1024)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(logits_of(loaded, ids), logits)
    bias = loaded.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and torch.equal(bias, model.model.layers[1].mlp.gate.e_score_correction_bias)
    bf16 = K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_fp8_round_trip_logits_close(tiny: tuple, tmp_path: Path) -> None:
    """Each quantized weight moves by <= 2^-4 of its block's amax (test_checkpoint_fp8.py), ~2.5% RMS; through the
    ~8 quantized matmuls per layer of k2-tiny (3 layers, init std 0.02) the logits moved by 4.1%, 4.6%, 5.4% of their
    RMS (seeds 0, 1, 2; measured with dequantized weights in load_state_dict). Bound: 12%. A model with unrelated
    weights is at ~140%, a missing or misapplied scale far above 12%."""
    model, ids, logits = tiny
    model.save_pretrained(tmp_path, fp8=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    loaded = K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.config.is_fp8
    err = (logits_of(loaded, ids) - logits).pow(2).mean().sqrt() / logits.pow(2).mean().sqrt()
    assert 0 < err.item() < 0.12


def test_hf_convention_fp8_checkpoint_loads(tiny: tuple, tmp_path: Path) -> None:
    """Written without our writer, the way the published checkpoint is laid out: `model-1-of-3.safetensors` names,
    `{"metadata": {}}` index, scales in a different shard from their weights, rotary_emb.inv_freq tensors, and the
    quantization_config transformers writes. The result must equal dequantizing by hand."""
    model, ids, _ = tiny
    sd = model.state_dict()
    shards: list[dict[str, torch.Tensor]] = [{}, {}, {}]
    expect = {}
    for i, (name, t) in enumerate(sd.items()):
        if name.endswith("_proj.weight") or name.endswith("_proj_with_mqa.weight"):
            q, s = quantize_block_fp8(t)
            shards[i % 3][name], shards[(i + 1) % 3][name + "_scale_inv"] = q, s
            s_full = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            expect[name] = q.float() * s_full
        else:
            shards[i % 3][name] = t.to(torch.bfloat16) if name.endswith("norm.weight") else t
            expect[name] = shards[i % 3][name].float()
    for i in range(model.config.num_hidden_layers):
        shards[i % 3][f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    weight_map = {}
    for i, tensors in enumerate(shards):
        file = f"model-{i + 1}-of-3.safetensors"
        save_file(tensors, tmp_path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.config.to_dict() | {"quantization_config": HF_FP8}
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ref = K2ForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    ref.load_state_dict(expect)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expect.items())
    assert torch.equal(logits_of(loaded, ids), logits_of(ref, ids))


def test_wrong_config_is_named(tiny: tuple, tmp_path: Path) -> None:
    model, _, _ = tiny
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"moe_intermediate_size": 48}))
    with pytest.raises(CheckpointError, match=r"shape mismatch for model.layers.1.mlp.experts.0.gate_proj.weight"):
        K2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
