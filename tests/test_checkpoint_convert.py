"""`kimi-k2 convert` through the real CLI entry point: fp8 -> bf16 -> fp8, streaming, config and extra files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kimi_k2.checkpoint.reader as reader_mod
import kimi_k2.checkpoint.writer as writer_mod
from kimi_k2.checkpoint import CheckpointReader, dequantize_block_fp8, save_state_dict
from kimi_k2.checkpoint.layout import expected_shapes
from kimi_k2.cli import main
from kimi_k2.cli.convert import parse_size
from kimi_k2.config import K2Config

# every 2-D weight K2 stores as block-FP8 has a 128-block edge here (kv_a_proj_with_mqa is 144 x 160)
CONFIG = K2Config.from_preset("k2-tiny").replace(
    vocab_size=50, hidden_size=160, intermediate_size=64, moe_intermediate_size=40, num_hidden_layers=2,
    kv_lora_rank=136, n_routed_experts=4)
SHAPES = expected_shapes(CONFIG)


def raw_tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in CheckpointReader(d).shards:
        with safe_open(d / shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


@pytest.fixture
def fp8_src(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    (tmp_path / "tiktoken.model").write_text("tok")
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
    save_state_dict(sd, tmp_path / "src", CONFIG, fp8=True, max_shard_size=40_000,
                    extra_files=[tmp_path / "tiktoken.model", tmp_path / "chat_template.jinja"])
    return tmp_path / "src"


def test_fp8_to_bf16_to_fp8(fp8_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []
    real_open = reader_mod.safe_open
    monkeypatch.setattr(reader_mod, "safe_open", lambda p, framework: opened.append(Path(p).name) or real_open(
        p, framework=framework))
    shard_bytes = []
    real_save = writer_mod.save_file
    monkeypatch.setattr(writer_mod, "save_file", lambda tensors, path, metadata: shard_bytes.append(
        (len(tensors), sum(t.nbytes for t in tensors.values()))) or real_save(tensors, path, metadata=metadata))
    bf16, fp8 = tmp_path / "bf16", tmp_path / "fp8"
    assert main(["convert", str(fp8_src), str(bf16), "--to", "bf16", "--max-shard-size", "30KB", "--no-progress"]) == 0
    # streamed: each source shard opened once, in order; the output buffered one <= 30 KB shard at a time (a
    # bigger tensor gets a shard of its own)
    assert opened == CheckpointReader(fp8_src).shards
    assert len(shard_bytes) > 1 and all(size <= 30_000 or n == 1 for n, size in shard_bytes)

    src = raw_tensors(fp8_src)
    out = raw_tensors(bf16)
    assert set(out) == set(SHAPES)  # no scales left
    for k, t in out.items():
        want_dtype = torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16
        assert t.dtype == want_dtype, k
        if src[k].dtype == torch.float8_e4m3fn:  # DeepSeek fp8_cast_bf16 semantics: W * S per block, in bf16
            assert torch.equal(t, dequantize_block_fp8(src[k], src[k + "_scale_inv"]))
        else:
            assert torch.equal(t, src[k].to(want_dtype)), k
    cfg = json.loads((bf16 / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert (bf16 / "tiktoken.model").read_text() == "tok" and (bf16 / "chat_template.jinja").exists()
    assert len(CheckpointReader(bf16).shards) > 1

    assert main(["convert", str(bf16), str(fp8), "--to", "fp8", "--no-progress"]) == 0
    back = raw_tensors(fp8)
    assert set(back) == set(src)
    for k, t in src.items():
        assert back[k].dtype == (t.dtype if t.dtype != torch.float32 or "_scale_inv" in k or "bias" in k
                                 else torch.bfloat16), k
        if k.endswith("_scale_inv"):  # bf16 rounding of W*S moves the recomputed amax by < 2^-8 relative
            torch.testing.assert_close(back[k], t, rtol=2**-8, atol=0)
        elif t.dtype == torch.float8_e4m3fn:  # ... which is far below the e4m3 step: the codes come back exactly
            assert torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)), k
        else:
            assert torch.equal(back[k], t.to(back[k].dtype)), k
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128] and cfg["torch_dtype"] == "bfloat16"
    assert (fp8 / "model.safetensors").exists()  # default 5GB shards: one file, no index


def test_convert_errors(fp8_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep").write_text("x")
    assert main(["convert", str(fp8_src), str(dst), "--to", "bf16", "--no-progress"]) == 1
    assert "exists and is not empty" in capsys.readouterr().err and (dst / "keep").exists()
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "o"), "--to", "bf16", "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(fp8_src), str(tmp_path / "o"), "--to", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["convert", str(fp8_src), str(dst), "--to", "bf16", "--overwrite", "--no-progress"]) == 0
    assert (dst / "keep").exists() and set(CheckpointReader(dst)) == set(CheckpointReader(fp8_src))


def wrote_nothing(dst: Path) -> bool:
    return not dst.exists() and not list(dst.parent.glob(f".{dst.name}.*"))


def test_convert_refuses_a_checkpoint_that_disagrees_with_its_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A weight missing, a tensor of another shape than config.json implies, a truncated shard: exit 1 with the
    tensor or file named, and nothing written (no DST, no temp folder)."""
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    gone = "model.layers.1.mlp.experts.2.up_proj.weight"
    save_state_dict({k: v for k, v in sd.items() if k != gone}, tmp_path / "missing", CONFIG)
    dst = tmp_path / "out"
    assert main(["convert", str(tmp_path / "missing"), str(dst), "--to", "fp8", "--no-progress"]) == 1
    assert f"lacks 1 tensors its config.json implies: ['{gone}']" in capsys.readouterr().err and wrote_nothing(dst)

    save_state_dict(sd, tmp_path / "shape", CONFIG.replace(kv_lora_rank=128))  # kv_a_proj, its norm, kv_b_proj: x2
    assert main(["convert", str(tmp_path / "shape"), str(dst), "--to", "bf16", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "6 tensors disagree with its config.json" in err and "model.layers.0.self_attn.kv_b_proj.weight" in err
    assert wrote_nothing(dst)

    save_state_dict(sd, tmp_path / "cut", CONFIG, max_shard_size=40_000)
    shard = sorted((tmp_path / "cut").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1])
    assert main(["convert", str(tmp_path / "cut"), str(dst), "--to", "bf16", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"lies outside {shard}" in err and "truncated" in err and "Traceback" not in err and wrote_nothing(dst)


@pytest.mark.parametrize(("text", "n"), [("5GB", 5 * 10**9), ("64MiB", 64 * 2**20), ("1000", 1000), ("1.5kb", 1500)])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "0", "5XB", "GB", "-1MB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid size"):
        parse_size(text)
