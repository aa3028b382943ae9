"""Expert (and head-parallel attention) inference: real `torchrun` (gloo, CPU) with 2 and 4 ranks against the
unsharded model in one process."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from parallel_fixtures import NEW_TOKENS, PROMPTS, greedy_reference, write_checkpoint

from kimi_k2.checkpoint import CheckpointReader, load_into
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.attention import MLA
from kimi_k2.parallel import (
    TPMLA,
    expert_range,
    load_expert_parallel,
    shard_attention,
    shard_experts,
)

TOP = 5  # log-probabilities compared per generated token: the chosen one and the top 5
EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ep") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return greedy_reference(checkpoint)


def test_expert_range_splits_evenly_and_rejects_bad_worlds():
    assert [list(expert_range(8, r, 4)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="n_routed_experts=8 is not divisible .* 3"):
        expert_range(8, 0, 3)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        expert_range(8, 2, 2)
    with torch.device("meta"):
        model = K2ForCausalLM(K2Config.from_preset("k2-tiny"))
    with pytest.raises(ValueError, match="not divisible"):
        shard_experts(model, 0, 3)


def test_a_rank_reads_only_its_experts_and_the_replicated_tensors(checkpoint, monkeypatch):
    read: list[str] = []
    real_read = CheckpointReader._read

    def spy(self, f, raw, shard, name, out):
        read.append(name)
        return real_read(self, f, raw, shard, name, out)

    monkeypatch.setattr(CheckpointReader, "_read", spy)
    model, reported = load_expert_parallel(checkpoint, rank=1, world=2, dtype=torch.float32)
    all_names = list(CheckpointReader(checkpoint))
    want = {n for n in all_names if not (m := EXPERT.search(n)) or int(m[1]) in range(4, 8)}
    assert set(read) == want == set(reported)
    assert len(read) == len(set(read))
    assert any(EXPERT.search(n) for n in read) and len(want) < len(all_names)
    for block in model.model.layers[1:]:
        assert sorted(block.mlp.experts, key=int) == ["4", "5", "6", "7"]
    assert not any(p.is_meta for p in model.parameters())


def test_head_parallel_partial_outputs_sum_to_the_full_attention(checkpoint):
    full = K2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    x = torch.randn(2, 5, full.config.hidden_size, generator=torch.Generator().manual_seed(3))
    cos, sin = full.model.rotary(torch.arange(5).expand(2, 5), x.dtype)
    parts = []
    for rank in range(2):
        with torch.device("meta"):
            model = K2ForCausalLM(full.config)
            slices = shard_attention(model, rank, 2)
        load_into(model, CheckpointReader(checkpoint), torch.float32, parts=slices)
        attn = model.model.layers[1].self_attn
        assert isinstance(attn, TPMLA) and attn.n_heads == full.config.num_attention_heads // 2
        with torch.no_grad():
            parts.append(MLA.forward(attn, x, cos, sin))  # this rank's heads, before the all-reduce
    with torch.no_grad():
        torch.testing.assert_close(parts[0] + parts[1], full.model.layers[1].self_attn(x, cos, sin))


def test_head_parallel_rejects_bad_worlds():
    config = K2Config.from_preset("k2-tiny")  # 4 heads
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible .* 3"):
        TPMLA(config, 0, 0, 3)
    with pytest.raises(ValueError, match="attention_bias"):
        TPMLA(config.replace(attention_bias=True), 0, 0, 2)


def run_ep(checkpoint, nproc: int, tp: bool) -> list[dict]:
    """`kimi-k2 generate CKPT ...` greedy over PROMPTS: one process, or `--ep nproc` under torchrun."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    ep = ["--ep", str(nproc), *(["--tp-attention"] if tp else [])] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "kimi_k2.cli", "generate", str(checkpoint), *ep,
           "--max-tokens", str(NEW_TOKENS), "--temperature", "0", "--ignore-eos", "--dtype", "float32", "--json",
           "--logprobs", str(TOP)]
    for p in PROMPTS:
        cmd += ["--ids", " ".join(map(str, p))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda r: r["prompt"])


# 4 ranks with the heads split (shard_experts + shard_attention) in the default run: test_parallel_tensor's [4-True]
@pytest.mark.parametrize(("nproc", "tp"), [pytest.param(1, False, marks=pytest.mark.slow), (2, False),
                                           pytest.param(4, False, marks=pytest.mark.slow),
                                           pytest.param(4, True, marks=pytest.mark.slow)])
def test_expert_parallel_greedy_output_matches_one_process(checkpoint, reference, nproc, tp):
    """The engine over 1, 2 or 4 ranks (experts, and with tp attention heads, split) generates the unsharded model's
    greedy tokens with its log-probabilities. (Which tensors a rank reads: the in-process test above.)"""
    records = run_ep(checkpoint, nproc, tp)
    tokens, logits = reference
    assert [r["token_ids"] for r in records] == tokens
    want = logits.log_softmax(-1)  # [B, n, vocab]
    for b, r in enumerate(records):
        got = torch.tensor([[lp["logprob"]] + [v for _, v in lp["top"]] for lp in r["logprobs"]])
        top = want[b].topk(TOP, dim=-1)
        assert [[t for t, _ in lp["top"]] for lp in r["logprobs"]] == top.indices.tolist()
        torch.testing.assert_close(got, torch.cat([want[b].max(-1, keepdim=True).values, top.values], 1),
                                   rtol=0, atol=1e-5)
