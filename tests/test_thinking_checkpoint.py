"""Kimi-K2-Thinking checkpoints: the compressed-tensors INT4 packing (checked against the rule as compressed-tensors'
`pack_to_int32` documents it), loading through `load_into`, `kimi-k2 convert` to and from INT4, the preset and
`kimi-k2 info` bytes, and a small checkpoint in the published layout loaded and run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from thinking_fixtures import make_thinking_dir

from kimi_k2.checkpoint import CheckpointError, CheckpointReader, Slice, save_state_dict
from kimi_k2.checkpoint.int4 import dequantize_int4, is_int4_target, pack_int4, quantize_int4, unpack_int4
from kimi_k2.checkpoint.layout import expected_shapes
from kimi_k2.cli import main
from kimi_k2.config import K2Config, int4_quantization_config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.info import model_info
from kimi_k2.tokenizer import Tokenizer

TINY = K2Config.from_preset("k2-tiny")


def reference_pack(q: np.ndarray) -> np.ndarray:
    """compressed-tensors `pack_to_int32` as its docstring states it: shift to unsigned (q + 8), pad the row to a
    multiple of 8, and put value i of each run of 8 at bits 4i..4i+3 of one uint32, read back as int32."""
    u = (q.astype(np.int64) + 8).astype(np.uint32)
    pad = -q.shape[1] % 8
    u = np.pad(u, ((0, 0), (0, pad)))
    words = np.zeros((q.shape[0], u.shape[1] // 8), dtype=np.uint32)
    for i in range(8):
        words |= u[:, i::8] << np.uint32(4 * i)
    return words.view(np.int32)


# ---- the format ------------------------------------------------------------------------------------------
def test_pack_known_values() -> None:
    q = torch.tensor([list(range(-8, 8)), [0] * 16], dtype=torch.int8)
    packed = pack_int4(q)
    # row 0: nibbles 0..7 then 8..15, lowest first -> 0x76543210 and 0xFEDCBA98; row 1: all 8s
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[0x76543210, 0xFEDCBA98 - 2**32], [0x88888888 - 2**32] * 2]
    assert torch.equal(unpack_int4(packed, (2, 16)), q)


@pytest.mark.parametrize("cols", [1, 7, 8, 33, 64, 100])
def test_pack_matches_the_documented_rule(cols: int) -> None:
    g = torch.Generator().manual_seed(cols)
    q = torch.randint(-8, 8, (5, cols), generator=g, dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (5, math.ceil(cols / 8))
    assert np.array_equal(packed.numpy(), reference_pack(q.numpy()))
    assert torch.equal(unpack_int4(packed, (5, cols)), q)


def test_pack_rejects_out_of_range_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="int32"):
        unpack_int4(torch.zeros(2, 3, dtype=torch.int32), (2, 32))


def test_dequantize_is_q_times_the_group_scale() -> None:
    q = torch.randint(-8, 8, (3, 70), dtype=torch.int8)
    scale = torch.rand(3, 3).to(torch.bfloat16)  # groups of 32: columns 0-31, 32-63, 64-69
    w = dequantize_int4(pack_int4(q), scale, (3, 70), 32)
    for n in range(70):
        assert torch.equal(w[:, n], q[:, n].float() * scale[:, n // 32].float())
    with pytest.raises(ValueError, match="weight_scale"):
        dequantize_int4(pack_int4(q), scale[:, :2], (3, 70), 32)


def test_quantize_round_trips_exactly_through_fp32() -> None:
    w = torch.randn(8, 96)
    stored = quantize_int4(w, 32)
    assert stored["weight_scale"].dtype == torch.bfloat16 and stored["weight_shape"].tolist() == [8, 96]
    deq = dequantize_int4(stored["weight_packed"], stored["weight_scale"], (8, 96), 32)
    assert (deq - w).abs().max() <= stored["weight_scale"].float().max() / 2 * 1.01  # round to nearest level
    again = quantize_int4(deq, 32)
    assert all(torch.equal(stored[k], again[k]) for k in stored)


def test_k2_thinking_targets_are_the_routed_experts() -> None:
    q = K2Config.from_preset("kimi-k2-thinking").quantization_config
    names = expected_shapes(TINY)
    chosen = {n for n in names if is_int4_target(n, q)}
    assert chosen == {n for n in names if ".mlp.experts." in n}
    assert not is_int4_target("lm_head.weight", q) and not is_int4_target("model.layers.0.mlp.gate_proj.weight", q)


@pytest.mark.parametrize("change, match", [
    ({"format": "int-quantized"}, "format"),
    ({"num_bits": 8}, "num_bits"),
    ({"symmetric": False}, "symmetric"),
    ({"strategy": "channel"}, "strategy"),
    ({"actorder": "group"}, "actorder"),
    ({"group_size": 0}, "group_size"),
])
def test_unsupported_quantization_configs_are_named(change: dict, match: str) -> None:
    q = int4_quantization_config()
    if "format" in change:
        q.update(change)
    else:
        q["config_groups"]["group_0"]["weights"].update(change)
    with pytest.raises(ValueError, match=match):
        TINY.replace(quantization_config=q)


# ---- info --------------------------------------------------------------------------------------------
def test_thinking_preset_info() -> None:
    c = K2Config.from_preset("kimi-k2-thinking")
    info = model_info(c)
    assert c.is_int4 and c.int4_group_size == 32 and c.max_position_embeddings == 262144
    assert info.total_params == model_info(K2Config.from_preset("kimi-k2-instruct")).total_params
    expert = 3 * 2048 * 7168
    n_experts = 60 * 384
    # per expert weight [2048, 7168] or [7168, 2048]: 4 bits per value, a bf16 scale per 32, an int32 [2] shape
    routed = n_experts * (expert // 2 + expert // 32 * 2 + 3 * 8)
    assert info.int4_component_bytes["routed_experts"] == routed
    assert info.int4_bytes == info.bf16_bytes - info.bf16_component_bytes["routed_experts"] + routed
    assert round(info.int4_bytes / 1e9, 1) == 594.2  # of which the experts 570.8 GB: 0.5625 bytes a weight


def test_int4_bytes_equal_the_stored_tensors(tmp_path: Path) -> None:
    model = K2ForCausalLM.from_config(TINY, torch.bfloat16)
    save_state_dict(model.state_dict(), tmp_path, TINY, int4=True)
    stored = 0
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for name in f.keys():
            t = f.get_slice(name)
            stored += math.prod(t.get_shape()) * {"BF16": 2, "F32": 4, "I32": 4}[t.get_dtype()]
    assert model_info(TINY).int4_bytes == stored
    assert main(["info", str(tmp_path)]) == 0


# ---- loading --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, K2ForCausalLM]:
    torch.manual_seed(1)
    model = K2ForCausalLM.from_config(TINY, torch.float32)
    out = tmp_path_factory.mktemp("int4") / "ck"
    save_state_dict(model.state_dict(), out, TINY, int4=True, max_shard_size=40_000)  # scales in other shards too
    return out, model


def test_reader_presents_one_logical_weight(int4_dir) -> None:
    out, model = int4_dir
    reader = CheckpointReader(out)
    assert set(reader) == set(model.state_dict())
    experts = [n for n in reader if reader.is_int4(n)]
    assert experts and all(".mlp.experts." in n for n in experts)
    name = experts[0]
    assert reader.shape(name) == tuple(model.state_dict()[name].shape) and reader.stored_dtype(name) == torch.bfloat16
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {name + "_packed", name + "_scale", name + "_shape"} <= set(index) and name not in index


def test_load_into_dequantizes_exactly(int4_dir) -> None:
    out, model = int4_dir
    loaded = K2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    reader = CheckpointReader(out)
    for name, t in loaded.state_dict().items():
        want = model.state_dict()[name]
        if reader.is_int4(name):
            stored = reader.stored_int4(name)
            exact = dequantize_int4(stored[name + "_packed"], stored[name + "_scale"], tuple(want.shape), 32)
            assert torch.equal(t, exact), name
            assert (t - want).abs().max() <= stored[name + "_scale"].float().max() * 0.51
        else:
            assert torch.equal(t, want), name
    # default dtype: the scales' (bf16), as the model would run it
    default = K2ForCausalLM.from_pretrained(out).state_dict()
    assert all(default[n].dtype == torch.bfloat16 for n in reader if reader.is_int4(n))


def test_load_into_slices_int4_rows_and_columns(int4_dir) -> None:
    out, _ = int4_dir
    reader = CheckpointReader(out)
    name = next(n for n in reader if reader.is_int4(n))
    full = reader.get(name, torch.float32)
    rows, cols = full.shape
    for dim, start, stop in ((0, 3, rows - 2), (1, 5, cols - 7)):
        target = torch.empty(full.narrow(dim, start, stop - start).shape)
        reader.read_into({name: target}, {name: Slice(dim, start, stop)})
        assert torch.equal(target, full.narrow(dim, start, stop - start))


def _corrupt(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(f))
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_broken_int4_checkpoints_are_named(int4_dir, tmp_path: Path) -> None:
    out, _ = int4_dir
    name = next(n for n in CheckpointReader(out) if CheckpointReader(out).is_int4(n))
    cases = {
        "no-scale": (lambda t: t.pop(name + "_scale"), "has no .*_scale"),
        "short-packed": (lambda t: t.update({name + "_packed": t[name + "_packed"][:, :-1].clone()}), "needs int32"),
        "zero-point": (lambda t: t.update({name + "_zero_point": torch.zeros(1, dtype=torch.int32)}), "zero point"),
        "bad-shape": (lambda t: t.update({name + "_shape": torch.tensor([0, 5], dtype=torch.int32)}), "two positive"),
        "both": (lambda t: t.update({name: torch.zeros(2)}), "both unquantized and as INT4"),
    }
    for label, (edit, match) in cases.items():
        with pytest.raises(CheckpointError, match=match):
            CheckpointReader(_corrupt(out, tmp_path / label, edit))
    plain = _corrupt(out, tmp_path / "no-config", lambda t: None)
    (plain / "config.json").write_text(json.dumps(TINY.to_dict()))
    with pytest.raises(CheckpointError, match="no compressed-tensors quantization_config"):
        CheckpointReader(plain)


def test_load_into_expert_parallel_reads_only_its_experts(int4_dir) -> None:
    out, model = int4_dir
    sd = model.state_dict()
    mine = {n: torch.empty_like(t) for n, t in sd.items() if ".experts.0." in n}
    reader = CheckpointReader(out)
    reader.read_into(mine)
    for n, t in mine.items():
        assert torch.equal(t, reader.get(n, torch.float32))


# ---- convert --------------------------------------------------------------------------------------------
def test_convert_int4_bf16_fp8_and_back(int4_dir, tmp_path: Path) -> None:
    out, _ = int4_dir
    for to in ("bf16", "fp8", "int4"):
        assert main(["convert", str(out), str(tmp_path / to), "--to", to, "--no-progress"]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    src, again = CheckpointReader(out), CheckpointReader(tmp_path / "int4")
    for n in src:  # INT4 -> INT4: the packed tensors are copied bit for bit
        if src.is_int4(n):
            a, b = src.stored_int4(n), again.stored_int4(n)
            assert all(torch.equal(a[k], b[k]) for k in a)
    # bf16 -> INT4 recovers every 4-bit value (the bf16 rounding of q * scale is far below half a level)
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "back"), "--to", "int4", "--no-progress"]) == 0
    back = CheckpointReader(tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"] == \
        json.loads((out / "config.json").read_text())["quantization_config"]
    for n in src:
        if src.is_int4(n):
            a, b = src.stored_int4(n), back.stored_int4(n)
            assert torch.equal(a[n + "_packed"], b[n + "_packed"]), n
            assert (a[n + "_scale"].float() - b[n + "_scale"].float()).abs().max() <= \
                a[n + "_scale"].float().abs().max() * 2**-7
    # an fp8 (K2-Instruct layout) checkpoint converts to the K2-Thinking layout, and loads
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "fp8-int4"), "--to", "int4", "--no-progress"]) == 0
    assert K2ForCausalLM.from_pretrained(tmp_path / "fp8-int4").config.is_int4


# ---- the published layout ----------------------------------------------------------------------------------
def test_thinking_layout_loads_and_generates(k2_tokenizer_dir: Path, tmp_path: Path) -> None:
    from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams

    d = make_thinking_dir(k2_tokenizer_dir, tmp_path / "K2-Thinking-tiny")
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
            "chat_template.jinja"} <= names and any(n.startswith("model-00001-of-") for n in names)
    config = json.loads((d / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["format"] == "pack-quantized"
    tok = Tokenizer.from_pretrained(d)
    assert tok.token_to_id("<think>") == tok.num_base_tokens + 22 and tok.token_to_id("</think>") == \
        tok.num_base_tokens + 23
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "yo", "reasoning_content": "greet"},
                                      {"role": "user", "content": "again"}])
    assert "<think></think>yo" in prompt  # reasoning of turns before the last answer is dropped, as published
    engine = LLMEngine.from_pretrained(d, config=EngineConfig(memory_budget_bytes=1 << 24), dtype=torch.float32)
    out = engine.generate([tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)],
                          SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0][0].token_ids) == 4
