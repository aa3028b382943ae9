"""The tensors a K2 / DeepSeek-V3 checkpoint of a given config holds: Hugging Face names -> shapes, in closed form.

These are exactly the parameters and persistent buffers of `K2ForCausalLM(config)` (tests/test_checkpoint_layout.py
compares the two), so a checkpoint can be checked against its config.json without building the model (a 1 T model
on the meta device takes half a minute). Block-FP8 `_scale_inv` companions and the three stored tensors of an INT4
weight are not listed: the reader presents each quantized weight as one logical tensor.
"""

from __future__ import annotations

from kimi_k2.checkpoint.int4 import is_int4_target
from kimi_k2.checkpoint.reader import CheckpointError, CheckpointReader, name_list
from kimi_k2.config import K2Config

Shape = tuple[int, ...]


def _linear(shapes: dict[str, Shape], name: str, in_features: int, out_features: int, bias: bool = False) -> None:
    shapes[f"{name}.weight"] = (out_features, in_features)
    if bias:
        shapes[f"{name}.bias"] = (out_features,)


def _swiglu(shapes: dict[str, Shape], prefix: str, dim: int, inter: int) -> None:
    _linear(shapes, f"{prefix}gate_proj", dim, inter)
    _linear(shapes, f"{prefix}up_proj", dim, inter)
    _linear(shapes, f"{prefix}down_proj", inter, dim)


def expected_shapes(config: K2Config) -> dict[str, Shape]:
    """Every tensor name of a checkpoint of `config` -> its shape (logical: an fp8 weight's own shape)."""
    c, D = config, config.hidden_size
    H, bias = c.num_attention_heads, c.attention_bias
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (c.vocab_size, D)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        if c.q_lora_rank is None:
            _linear(shapes, a + "q_proj", D, H * c.qk_head_dim)
        else:  # q = W_UQ(norm(W_DQ x))
            _linear(shapes, a + "q_a_proj", D, c.q_lora_rank, bias)
            shapes[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
            _linear(shapes, a + "q_b_proj", c.q_lora_rank, H * c.qk_head_dim)
        _linear(shapes, a + "kv_a_proj_with_mqa", D, c.kv_lora_rank + c.qk_rope_head_dim, bias)
        shapes[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        _linear(shapes, a + "kv_b_proj", c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim))
        _linear(shapes, a + "o_proj", H * c.v_head_dim, D, bias)
        if c.is_moe_layer(i):
            assert c.n_routed_experts is not None  # is_moe_layer says so
            shapes[p + "mlp.gate.weight"] = (c.n_routed_experts, D)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (c.n_routed_experts,)
            for e in range(c.n_routed_experts):
                _swiglu(shapes, f"{p}mlp.experts.{e}.", D, c.moe_intermediate_size)
            _swiglu(shapes, p + "mlp.shared_experts.", D, c.moe_intermediate_size * (c.n_shared_experts or 1))
        else:
            _swiglu(shapes, p + "mlp.", D, c.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
    shapes["model.norm.weight"] = (D,)
    shapes["lm_head.weight"] = (c.vocab_size, D)
    return shapes


def check_layout(reader: CheckpointReader, config: K2Config) -> None:
    """Raise CheckpointError unless the checkpoint holds exactly the tensors `config` implies, with their shapes."""
    want = expected_shapes(config)
    where = f"checkpoint {reader.directory}"
    if missing := [n for n in want if n not in reader]:
        raise CheckpointError(f"{where} lacks {len(missing)} tensors its config.json implies: {name_list(missing)}")
    if unexpected := [n for n in reader if n not in want]:
        raise CheckpointError(f"{where} has {len(unexpected)} tensors its config.json does not imply: "
                              f"{name_list(unexpected)}")
    if wrong := [f"{n} {reader.shape(n)} (config: {s})" for n, s in want.items() if reader.shape(n) != s]:
        raise CheckpointError(f"{where}: {len(wrong)} tensors disagree with its config.json: {name_list(wrong, 5)}")
    q = config.quantization_config if config.is_int4 else None
    if odd := [n for n in want if reader.is_int4(n) != (q is not None and is_int4_target(n, q))]:
        raise CheckpointError(f"{where}: {len(odd)} tensors are INT4 where its config.json's quantization_config "
                              f"says otherwise (or the reverse): {name_list(odd, 5)}")
