"""The K2 decoder: pre-norm blocks of MLA + (dense SwiGLU MLP | MoE), DeepSeek-V3 layout and checkpoint names."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import load_into, save_state_dict
from ..config import K2Config
from .attention import MLA
from .cache import LatentCache
from .layers import MLP, Embedding, Linear, RMSNorm
from .moe import MoE
from .rope import RotaryEmbedding

__all__ = ["Block", "K2ForCausalLM", "K2Model", "MLP", "RMSNorm"]


class Block(nn.Module):
    """h = x + MLA(norm(x));  out = h + FFN(norm(h)),  FFN = MoE from `first_k_dense_replace` on, else dense MLP."""

    def __init__(self, config: K2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.mlp: MLP | MoE = MoE(config) if config.is_moe_layer(layer_idx) else MLP(
            config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class K2Model(nn.Module):
    def __init__(self, config: K2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: LatentCache | None = None
    ) -> torch.Tensor:
        """input_ids [B, S] -> hidden [B, S, D] after the final norm. positions [B, S] default to arange(S)."""
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor [B, S], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        lo, hi = (int(t) for t in torch.aminmax(input_ids)) if input_ids.numel() else (0, 0)
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids out of range [0, {self.config.vocab_size}): min {lo}, max {hi}")
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        elif positions.shape != input_ids.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} != input_ids shape {tuple(input_ids.shape)}")
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        return self.norm(h)


class K2ForCausalLM(nn.Module):
    def __init__(self, config: K2Config) -> None:
        super().__init__()
        if config.tie_word_embeddings:  # K2 and DeepSeek-V3 keep a separate lm_head.weight
            raise ValueError("tie_word_embeddings=True is not supported: K2 checkpoints have their own lm_head.weight")
        self.config = config
        self.model = K2Model(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: LatentCache | None = None
    ) -> torch.Tensor:
        """input_ids [B, S] -> fp32 logits [B, S, vocab]."""
        return self.lm_head(self.model(input_ids, positions, cache)).float()

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, initializer_range) for every projection, embedding and router; norms 1; biases 0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, MoE):
                m.gate.weight.normal_(0.0, std)
                m.gate.e_score_correction_bias.zero_()

    @classmethod
    def from_config(
        cls, config: K2Config, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> K2ForCausalLM:
        """A randomly initialized model; dtype defaults to config.torch_dtype."""
        if dtype is None:
            dtype = getattr(torch, config.torch_dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"config torch_dtype {config.torch_dtype!r} is not a torch dtype")
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model.to(dtype)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], dtype: torch.dtype | None = torch.bfloat16,
        device: str | torch.device = "cpu",
    ) -> K2ForCausalLM:
        """Build on the meta device, then materialize every tensor from the safetensors files (fp8 dequantized).

        dtype=None keeps each tensor's stored dtype (fp8 -> bf16); the router bias always stays fp32.
        """
        config = K2Config.from_pretrained(path)
        with torch.device("meta"):
            model = cls(config)
        load_into(model, path, dtype=dtype, device=device)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike[str], fp8: bool = False, max_shard_size: int = 5 * 2**30) -> Path:
        save_state_dict(self.state_dict(), path, self.config, fp8=fp8, max_shard_size=max_shard_size)
        return Path(path)
