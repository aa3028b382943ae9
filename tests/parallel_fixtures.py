"""The checkpoint and greedy reference that the torchrun inference tests (expert and tensor parallel) compare ranks
against."""

from pathlib import Path

import torch

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.parallel import CachedStepper, greedy_generate

PROMPTS = [[5, 17, 99, 3, 250], [42, 7, 311, 8, 64]]  # B*S = 10 tokens: uneven slices over 4 ranks
NEW_TOKENS = 6


def write_checkpoint(out: Path) -> Path:
    """k2-tiny (4 heads, 8 experts, layers 1-2 MoE, vocab 512) with a router bias, so selection differs from scores
    alone as in K2; block-FP8 in many shards, so ranks read whole 128-blocks, sliced."""
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"))
    with torch.no_grad():
        for block in model.model.layers[1:]:
            block.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    model.save_pretrained(out, fp8=True, max_shard_size=100_000)
    return out


def greedy_reference(checkpoint: Path) -> list:
    """The unsharded model's greedy continuation of PROMPTS."""
    model = K2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    return greedy_generate(CachedStepper(model, 16), PROMPTS, NEW_TOKENS)
