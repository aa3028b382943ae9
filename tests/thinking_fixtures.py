"""A small checkpoint in Kimi-K2-Thinking's published layout: config.json with the compressed-tensors INT4
quantization_config, routed experts as weight_packed / weight_scale / weight_shape in sharded safetensors with an
index, the rest bf16, the tiktoken tokenizer with the K2-Thinking specials (<think> = </think> - 1 at offsets 22/23,
as 163606/163607 in the real vocabulary) and K2-Thinking's chat template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kimi_k2.checkpoint import save_state_dict
from kimi_k2.config import K2Config, int4_quantization_config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer.chat_template import builtin_template
from kimi_k2.tokenizer.specials import K2_THINKING_SPECIAL_OFFSETS, added_tokens_decoder


def thinking_tokenizer_files(tokenizer_dir: Path, out: Path) -> int:
    """Write tiktoken.model (from `tokenizer_dir`), a tokenizer_config.json with the K2-Thinking specials and the
    K2-Thinking chat_template.jinja into `out` -> the vocabulary size (base tokens + 256 specials)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_dir / "tiktoken.model", out / "tiktoken.model")
    n = sum(1 for line in (tokenizer_dir / "tiktoken.model").read_text().splitlines() if line.strip())
    config = {"added_tokens_decoder": added_tokens_decoder(n, K2_THINKING_SPECIAL_OFFSETS), "bos_token": "[BOS]",
              "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]", "tokenizer_class": "TikTokenTokenizer"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(builtin_template("kimi_k2_thinking"))
    return n + 256


def make_thinking_dir(tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """k2-tiny widths with the tokenizer's vocabulary, random (seeded) bf16 weights, routed experts INT4."""
    staging = out.parent / f".{out.name}-tokenizer"
    vocab = thinking_tokenizer_files(tokenizer_dir, staging)
    config = K2Config.from_preset("k2-tiny").replace(
        vocab_size=vocab, bos_token_id=vocab - 256, eos_token_id=vocab - 255,  # [BOS], [EOS]
        quantization_config=int4_quantization_config(), torch_dtype="bfloat16")
    torch.manual_seed(seed)
    model = K2ForCausalLM.from_config(config, torch.bfloat16)
    save_state_dict(model.state_dict(), out, config, int4=True, max_shard_size=60_000,
                    extra_files=sorted(staging.iterdir()))
    shutil.rmtree(staging)
    return out
