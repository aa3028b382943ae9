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

# what the scripted model of make_scripted_thinking_dir writes for the server tests: `<think>hmm</think>`, then a
# call of the tool `lookup` with `{}` (one token each in the tests' trained tokenizer, none repeated)
LOOKUP_SCRIPT = ["<think>", "h", "mm", "</think>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>", "function",
                 "s", ".", "lo", "ok", "up", ":", "0", "<|tool_call_argument_begin|>", "{", "}", "<|tool_call_end|>",
                 "<|tool_calls_section_end|>"]
LOOKUP_TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look it up",
                                                  "parameters": {"type": "object", "properties": {}}}}]


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


def script_model(model: K2ForCausalLM, chain: list[int], end: int, strength: float = 4.0) -> K2ForCausalLM:
    """Make `model` a bigram machine that, whatever came before, follows token chain[i] with chain[i + 1] and ends
    the chain, and any other token, with `end`: every attention and MLP output projection is zeroed (the residual
    stream stays the token's embedding), chain token i embeds as basis vector i + 1 and every other token as basis
    vector 0, and lm_head maps each basis vector to its successor with logit strength * sqrt(hidden) (32 here), so
    the successor wins by e^32 over the rest, sampled or greedy, unless a constraint forbids it. A real checkpoint
    through the real engine, with an output known in advance (for reasoning + tool-call tests)."""
    D = model.config.hidden_size
    if len(set(chain)) != len(chain) or end in chain or len(chain) + 1 > D:
        raise ValueError("the chain needs distinct tokens, not `end`, and fewer than hidden_size of them")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        embed.zero_()
        embed[:, 0] = 1
        head.zero_()
        for i, tok in enumerate(chain):
            embed[tok].zero_()
            embed[tok, i + 1] = 1
            head[chain[i + 1] if i + 1 < len(chain) else end, i + 1] = strength
        head[end, 0] = strength
        model.model.norm.weight.fill_(1)
    return model


def make_scripted_thinking_dir(tokenizer_dir: Path, out: Path, after_prompt: list[str]) -> Path:
    """A K2-Thinking-layout checkpoint (as make_thinking_dir) whose model writes `after_prompt` (special-token names
    or text that is one token each) after the generation prompt's <|im_middle|>, then <|im_end|>."""
    staging = out.parent / f".{out.name}-tokenizer"
    vocab = thinking_tokenizer_files(tokenizer_dir, staging)
    from kimi_k2.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(staging)
    chain = [tok.token_to_id("<|im_middle|>")] + [tok.token_to_id(t) for t in after_prompt]
    config = K2Config.from_preset("k2-tiny").replace(
        vocab_size=vocab, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        quantization_config=int4_quantization_config(), torch_dtype="bfloat16")
    model = script_model(K2ForCausalLM.from_config(config, torch.float32), chain, tok.im_end_id)
    save_state_dict({k: v.to(torch.bfloat16) if v.dtype == torch.float32 and "correction_bias" not in k else v
                     for k, v in model.state_dict().items()}, out, config, int4=True, max_shard_size=60_000,
                    extra_files=sorted(staging.iterdir()))
    shutil.rmtree(staging)
    return out
