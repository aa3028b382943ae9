"""Parameter counts, KV-cache bytes per token and weight bytes of a K2 model (`kimi-k2 info`).

Counts come from the model itself, built on the meta device (no memory), so they follow the checkpoint tensors
exactly: every parameter plus the routers' e_score_correction_bias.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..checkpoint.fp8 import is_quantized_name
from ..config import K2Config
from .transformer import K2ForCausalLM

COMPONENTS = ("embeddings", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "lm_head")


@dataclass
class ModelInfo:
    total_params: int
    activated_params: int  # per token: everything but the routed experts a token does not use
    components: dict[str, int]  # COMPONENTS -> parameter count
    kv_bytes_per_token: int  # MLA latent cache, bf16: (kv_lora_rank + qk_rope_head_dim) * layers * 2
    naive_kv_bytes_per_token: int  # per-head K and V, bf16: heads * (qk_head_dim + v_head_dim) * layers * 2
    bf16_bytes: int  # every tensor bf16, the fp32 router bias excepted
    fp8_bytes: int  # projections e4m3 + fp32 scale per 128x128 block; the rest as in bf16_bytes
    bf16_component_bytes: dict[str, int]  # COMPONENTS -> bytes, as bf16_bytes
    fp8_component_bytes: dict[str, int]  # COMPONENTS -> bytes, as fp8_bytes
    context_length: int

    @property
    def kv_ratio(self) -> float:
        return self.naive_kv_bytes_per_token / self.kv_bytes_per_token

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "kv_ratio": self.kv_ratio}


def kv_bytes_per_token(config: K2Config, dtype_bytes: int = 2) -> int:
    """Bytes the latent cache holds per token over all layers: one c_kv and one shared rotated k_pe per layer."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype_bytes


def _component(name: str) -> str:
    if name.startswith("model.embed_tokens."):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.endswith("norm.weight"):
        return "norms"
    if ".mlp.experts." in name:
        return "routed_experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    raise ValueError(f"cannot classify checkpoint tensor {name!r}")


def model_info(config: K2Config) -> ModelInfo:
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    components = dict.fromkeys(COMPONENTS, 0)
    bf16 = dict.fromkeys(COMPONENTS, 0)
    fp8 = dict.fromkeys(COMPONENTS, 0)
    bm, bn = config.weight_block_size
    for name, t in model.state_dict().items():
        n, part = t.numel(), _component(name)
        components[part] += n
        rest = n * t.element_size() if t.dtype == torch.float32 and name.endswith("e_score_correction_bias") else n * 2
        bf16[part] += rest
        if is_quantized_name(name):
            fp8[part] += n + math.ceil(t.shape[0] / bm) * math.ceil(t.shape[1] / bn) * 4
        else:
            fp8[part] += rest
    total = sum(components.values())
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    unused = 0
    if n_moe:
        per_layer = components["routed_experts"] // n_moe
        unused = n_moe * (per_layer - per_layer * config.num_experts_per_tok // config.n_routed_experts)
    naive = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * config.num_hidden_layers * 2
    return ModelInfo(total, total - unused, components, kv_bytes_per_token(config), naive, sum(bf16.values()),
                     sum(fp8.values()), bf16, fp8, config.max_position_embeddings)
