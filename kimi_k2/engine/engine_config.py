"""EngineConfig: page pool size, batch limits and context length of an LLMEngine."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_k2.config import K2Config


def latent_bytes_per_token(config: K2Config, dtype: torch.dtype) -> int:
    """MLA latent cache: (kv_lora_rank + qk_rope_head_dim) values per token and layer."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype.itemsize


def per_head_bytes_per_token(config: K2Config, dtype: torch.dtype) -> int:
    """The cache MLA avoids: full per-head keys (qk_head_dim) and values (v_head_dim) per token and layer."""
    per_layer = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    return per_layer * config.num_hidden_layers * dtype.itemsize


@dataclass
class EngineConfig:
    page_size: int = 16  # tokens per cache page
    num_pages: int | None = None  # None: as many as memory_budget_bytes allows (at least one max_model_len)
    memory_budget_bytes: int = 256 << 20  # for the latent cache, when num_pages is None
    max_num_seqs: int = 64  # samples in flight per step
    max_num_batched_tokens: int = 2048  # token budget per step (decode tokens + prefill chunks)
    max_model_len: int | None = None  # prompt + completion; None: config.max_position_embeddings
    enable_prefix_caching: bool = True
    dtype: torch.dtype | None = None  # cache dtype; None: the model's
    # decode steps (one sequence or a batch) through torch.compile'd graphs (fp32 or quantized; built at start-up)
    compile_decode: bool = False
    # how compile_decode builds the decode graph: "inductor" (torch.compile in this process, `compiled_decode`) or
    # "aoti" (AOTInductor in a subprocess, cached on disk, run by torch's C++ runner: `aot_decode`)
    decode_backend: str = "inductor"
    # attention over the latent pages in decode steps: "torch" or "triton" (`paged_cache`); None: triton on CUDA
    attention_backend: str | None = None
    # decode steps replayed as CUDA graphs per batch-size bucket (`cuda_graphs`); None: on CUDA with the triton
    # backend. True on the CPU runs the same padded static-buffer step eagerly (what tests check without a GPU).
    cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("num_pages", "max_model_len"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"EngineConfig.{name} must be a positive int or None, got {v!r}")
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(f"EngineConfig.attention_backend must be None, 'torch' or 'triton', got "
                             f"{self.attention_backend!r}")
        if self.cuda_graphs not in (None, True, False):
            raise ValueError(f"EngineConfig.cuda_graphs must be None or a bool, got {self.cuda_graphs!r}")
        if not isinstance(self.compile_decode, bool):
            raise ValueError(f"EngineConfig.compile_decode must be a bool, got {self.compile_decode!r}")
        if self.decode_backend not in ("inductor", "aoti"):
            raise ValueError(f"EngineConfig.decode_backend must be 'inductor' or 'aoti', got {self.decode_backend!r}")
        if self.memory_budget_bytes < 1:
            raise ValueError(f"EngineConfig.memory_budget_bytes must be positive, got {self.memory_budget_bytes}")

    def resolve(self, config: K2Config, dtype: torch.dtype) -> tuple[int, int]:
        """(max_model_len, num_pages) for this model; the pool always holds one sequence of max_model_len."""
        max_len = self.max_model_len or config.max_position_embeddings
        if max_len > config.max_position_embeddings:
            raise ValueError(f"EngineConfig.max_model_len={max_len} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
        need = -(-max_len // self.page_size)
        if self.num_pages is None:
            page_bytes = self.page_size * latent_bytes_per_token(config, dtype)
            return max_len, max(need, self.memory_budget_bytes // page_bytes)
        if self.num_pages < need:
            raise ValueError(f"EngineConfig.num_pages={self.num_pages} pages of {self.page_size} tokens cannot hold "
                             f"one sequence of max_model_len={max_len}; raise num_pages or lower max_model_len")
        return max_len, self.num_pages
