"""Parameter counts, KV-cache bytes per token and weight bytes of a K2 model (`kimi-k2 info`), in closed form.

Every count follows from the config alone: `_tensors` lists the checkpoint's tensors (DeepSeek-V3 layout, as
`K2ForCausalLM` builds them) by shape and multiplicity, so the 1T model is counted without building it.
tests/test_model_info.py checks the counts against a model built on the meta device for several configs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import K2Config

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
    # routed experts INT4 as Kimi-K2-Thinking stores them (compressed-tensors pack-quantized: int32 words of eight
    # 4-bit values, a bf16 scale per group of inputs, an int32 [2] shape per weight); the rest as in bf16_bytes
    int4_bytes: int = 0
    int4_component_bytes: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def kv_ratio(self) -> float:
        return self.naive_kv_bytes_per_token / self.kv_bytes_per_token

    def to_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "kv_ratio": self.kv_ratio}


@dataclass(frozen=True)
class _Tensor:
    """`count` checkpoint tensors of one shape in one component."""

    component: str
    shape: tuple[int, ...]
    count: int
    projection: bool = False  # a `*_proj.weight`: stored block-FP8 in the published checkpoint
    dtype_bytes: int = 2  # stored size of one element when not FP8: bf16, the router's fp32 correction bias

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def kv_bytes_per_token(config: K2Config, dtype_bytes: int = 2) -> int:
    """Bytes the latent cache holds per token over all layers: one c_kv and one shared rotated k_pe per layer."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * dtype_bytes


def _swiglu(component: str, dim: int, inter: int, count: int) -> list[_Tensor]:
    """gate_proj and up_proj [inter, dim], down_proj [dim, inter]."""
    return [_Tensor(component, (inter, dim), 2 * count, True), _Tensor(component, (dim, inter), count, True)]


def _tensors(c: K2Config) -> list[_Tensor]:
    """Every tensor of the checkpoint (`model.safetensors.index.json` order aside), grouped by shape."""
    D, H, L = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    n_moe = sum(c.is_moe_layer(i) for i in range(L))
    bias = c.attention_bias
    out = [_Tensor("embeddings", (c.vocab_size, D), 1), _Tensor("lm_head", (c.vocab_size, D), 1),
           _Tensor("norms", (D,), 2 * L + 1)]  # input_layernorm and post_attention_layernorm per layer, final norm
    if c.q_lora_rank is None:  # q_proj [H * qk_head_dim, D]
        out.append(_Tensor("attention", (H * c.qk_head_dim, D), L, True))
    else:  # q_a_proj [q_lora_rank, D] (+ bias), q_a_layernorm, q_b_proj [H * qk_head_dim, q_lora_rank]
        out += [_Tensor("attention", (c.q_lora_rank, D), L, True), _Tensor("norms", (c.q_lora_rank,), L),
                _Tensor("attention", (H * c.qk_head_dim, c.q_lora_rank), L, True)]
        out += [_Tensor("attention", (c.q_lora_rank,), L)] if bias else []
    kv_a = c.kv_lora_rank + c.qk_rope_head_dim
    out += [_Tensor("attention", (kv_a, D), L, True),  # kv_a_proj_with_mqa (+ bias)
            _Tensor("norms", (c.kv_lora_rank,), L),  # kv_a_layernorm
            _Tensor("attention", (H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), L, True),  # kv_b_proj
            _Tensor("attention", (D, H * c.v_head_dim), L, True)]  # o_proj (+ bias)
    out += [_Tensor("attention", (kv_a,), L), _Tensor("attention", (D,), L)] if bias else []
    out += _swiglu("dense_mlp", D, c.intermediate_size, L - n_moe)
    if n_moe:
        E = c.n_routed_experts or 0
        out += _swiglu("routed_experts", D, c.moe_intermediate_size, n_moe * E)
        out += _swiglu("shared_experts", D, c.moe_intermediate_size * (c.n_shared_experts or 1), n_moe)
        out += [_Tensor("router", (E, D), n_moe), _Tensor("router", (E,), n_moe, dtype_bytes=4)]  # gate, bias
    return [t for t in out if t.count]


def _fp8_bytes(t: _Tensor, block: tuple[int, int]) -> int:
    """e4m3 weight + its `weight_scale_inv`: one fp32 per (zero-padded) block."""
    if not t.projection:
        return t.numel * t.dtype_bytes
    rows, cols = t.shape
    return t.numel + math.ceil(rows / block[0]) * math.ceil(cols / block[1]) * 4


def _int4_bytes(t: _Tensor, group: int) -> int:
    """A routed-expert weight [rows, cols] as weight_packed int32 [rows, ceil(cols/8)] + weight_scale bf16
    [rows, ceil(cols/group)] + weight_shape int32 [2]; anything else as in bf16."""
    if t.component != "routed_experts":
        return t.numel * t.dtype_bytes
    rows, cols = t.shape
    return rows * math.ceil(cols / 8) * 4 + rows * math.ceil(cols / group) * 2 + 2 * 4


def model_info(config: K2Config) -> ModelInfo:
    components = dict.fromkeys(COMPONENTS, 0)
    bf16 = dict.fromkeys(COMPONENTS, 0)
    fp8 = dict.fromkeys(COMPONENTS, 0)
    int4 = dict.fromkeys(COMPONENTS, 0)
    group = config.int4_group_size if config.is_int4 else 32
    for t in _tensors(config):
        components[t.component] += t.count * t.numel
        bf16[t.component] += t.count * t.numel * t.dtype_bytes
        fp8[t.component] += t.count * _fp8_bytes(t, config.weight_block_size)
        int4[t.component] += t.count * _int4_bytes(t, group)
    total = sum(components.values())
    n_moe = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    unused_experts = n_moe * ((config.n_routed_experts or 0) - (config.num_experts_per_tok or 0))
    expert = 3 * config.hidden_size * config.moe_intermediate_size
    naive = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * config.num_hidden_layers * 2
    return ModelInfo(total, total - unused_experts * expert, components, kv_bytes_per_token(config), naive,
                     sum(bf16.values()), sum(fp8.values()), bf16, fp8, config.max_position_embeddings,
                     sum(int4.values()), int4)
