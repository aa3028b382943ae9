"""Tensor-parallel inference (`--tensor-parallel-size N`, optionally `--enable-expert-parallel`): a rank's split
modules and slices, then real `torchrun` (gloo, CPU) with 2 and 4 ranks generating the unsharded model's greedy
tokens and log-probabilities."""

import json
import os
import subprocess
import sys

import pytest
import torch
from parallel_fixtures import NEW_TOKENS, PROMPTS, greedy_reference, write_checkpoint

from kimi_k2.checkpoint import CheckpointReader
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.parallel import shard_experts, shard_tensor_parallel
from kimi_k2.parallel.tensor import TPMLP, TPMoE, VocabParallelEmbedding, VocabParallelLMHead, vocab_range

TOP = 5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tp") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return greedy_reference(checkpoint)


def test_vocab_ranges_cover_the_vocabulary_once():
    assert [(r.start, r.stop) for r in (vocab_range(10, i, 3) for i in range(3))] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError, match="too small"):
        vocab_range(4, 0, 4 + 1)
    with pytest.raises(ValueError, match="not divisible"):
        TPMLP(8, 12, 0, 5)


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_shard_replaces_every_split_module_and_slices_match_the_checkpoint(checkpoint, expert_parallel):
    reader = CheckpointReader(checkpoint)
    with torch.device("meta"):
        model = K2ForCausalLM(K2Config.from_preset("k2-tiny"))
        if expert_parallel:
            shard_experts(model, 1, 4, same_input=True)
        slices = shard_tensor_parallel(model, 1, 4, expert_parallel=expert_parallel)
    assert isinstance(model.model.embed_tokens, VocabParallelEmbedding)
    assert isinstance(model.lm_head, VocabParallelLMHead) and model.lm_head.weight.shape == (128, 64)
    assert isinstance(model.model.layers[0].mlp, TPMLP)
    assert isinstance(model.model.layers[1].mlp, TPMoE) != expert_parallel
    state = model.state_dict()
    for name, part in slices.items():  # each slice has the shape of the module's tensor
        assert reader.part_shape(name, part) == tuple(state[name].shape), name
    experts = [n for n in slices if ".mlp.experts." in n]
    assert (len(experts) == 0) == expert_parallel


def run_tp(checkpoint, nproc: int, expert_parallel: bool) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "kimi_k2.cli", "generate", str(checkpoint), "--tensor-parallel-size", str(nproc),
           *(["--enable-expert-parallel"] if expert_parallel else []), "--device", "cpu",
           "--max-tokens", str(NEW_TOKENS), "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--json",
           "--logprobs", str(TOP)]
    for p in PROMPTS:
        cmd += ["--ids", " ".join(map(str, p))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["prompt"])


# tensor + expert parallel over torchrun in the default run: test_deploy_serve_ep's `serve --tensor-parallel-size 2
# --enable-expert-parallel` (the one-process greedy text); here tensor parallel alone on 2 ranks, logprobs included
@pytest.mark.parametrize(("nproc", "expert_parallel"), [
    (2, False), pytest.param(4, True, marks=pytest.mark.slow),
    pytest.param(4, False, marks=pytest.mark.slow), pytest.param(2, True, marks=pytest.mark.slow)])
def test_tensor_parallel_greedy_output_matches_one_process(checkpoint, reference, nproc, expert_parallel):
    records = run_tp(checkpoint, nproc, expert_parallel)
    tokens, logits = reference
    assert [r["token_ids"] for r in records] == tokens
    want = logits.log_softmax(-1)  # [B, n, vocab]
    for b, r in enumerate(records):
        got = torch.tensor([[lp["logprob"]] + [v for _, v in lp["top"]] for lp in r["logprobs"]])
        top = want[b].topk(TOP, dim=-1)
        assert [[t for t, _ in lp["top"]] for lp in r["logprobs"]] == top.indices.tolist()
        torch.testing.assert_close(got, torch.cat([want[b].max(-1, keepdim=True).values, top.values], 1),
                                   rtol=0, atol=1e-5)


def test_tensor_parallel_without_torchrun_says_how_to_launch(checkpoint, monkeypatch, capsys):
    from kimi_k2.cli import main

    for var in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(var, raising=False)
    assert main(["generate", str(checkpoint), "--tensor-parallel-size", "2", "--ids", "1 2", "--device", "cpu"]) == 1
    assert "torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_tensor_parallel_keeps_block_aligned_fp8_parts_fp8(tmp_path):
    from kimi_k2.checkpoint.fp8 import dequantize_block_fp8
    from kimi_k2.ops.triton.fp8_module import FP8Linear
    from kimi_k2.parallel import load_tensor_parallel

    torch.manual_seed(0)  # MLP widths of whole 128-blocks per rank at TP 2; 2 heads x 24 rows of q_b_proj are not
    config = K2Config.from_preset("k2-tiny").replace(hidden_size=256, intermediate_size=512, moe_intermediate_size=256)
    K2ForCausalLM.from_config(config).save_pretrained(tmp_path, fp8=True)
    reader = CheckpointReader(tmp_path)
    for rank in range(2):
        model, names = load_tensor_parallel(tmp_path, rank, 2, torch.float32, fp8_resident=True)
        mods = dict(model.named_modules())
        attn = "model.layers.1.self_attn."
        assert isinstance(mods[attn + "q_a_proj"], FP8Linear)  # replicated: whole
        assert not isinstance(mods[attn + "q_b_proj"], FP8Linear)  # 48 rows per rank: dequantized
        for name, dim, part in [("model.layers.0.mlp.gate_proj", 0, 256), ("model.layers.0.mlp.down_proj", 1, 256),
                                ("model.layers.2.mlp.experts.5.up_proj", 0, 128)]:
            m = mods[name]
            assert isinstance(m, FP8Linear) and f"{name}.weight" in names
            got = dequantize_block_fp8(m.weight, m.weight_scale_inv, (128, 128), dtype=torch.float32)
            want = reader.get(f"{name}.weight", torch.float32).narrow(dim, rank * part, part)
            assert torch.equal(got, want), name
