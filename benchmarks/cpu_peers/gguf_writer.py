"""Write one of our checkpoint directories as a GGUF file for llama.cpp (architecture `deepseek2`), with `gguf`.

    python benchmarks/cpu_peers/gguf_writer.py CHECKPOINT_DIR OUT.gguf --type f32|f16|q8_0 [--tokenizer DIR]

llama.cpp runs Kimi K2 / DeepSeek-V3 as `deepseek2`: MLA kept as one latent "head" (head_count_kv 1, key length
kv_lora_rank + rope dim), with kv_b_proj split per head into k_b (stored transposed, for absorbing W_UK into the
query) and v_b; routed experts stacked into one 3-D tensor per projection; the sigmoid router with its bias
(`exp_probs_b`); `expert_weights_scale` = routed_scaling_factor; YaRN rope keys (llama.cpp's loader multiplies the
stored `yarn_log_multiplier` by 10, so 0.1 * mscale_all_dim is stored). Names and shapes follow llama.cpp's
`src/models/deepseek2.cpp` loader (read there, not copied). The vocabulary is our tiktoken one as a gpt2-style
byte-level BPE (benchmarks/cpu_peers/vocab.py), pre-tokenizer `kimi-k2`, the 256 special slots CONTROL and the padding
ids up to vocab_size UNUSED. Rope pairs are already interleaved (DeepSeek's layout, llama.cpp's NORM rope): no permute.

Types: f32 (everything f32), f16 and q8_0 (2-D weights in that type, as llama.cpp's converter does; 1-D tensors,
norms and the router stay f32; a weight whose rows are not a multiple of 32 falls back from q8_0 to f16).
YaRN's beta_fast/beta_slow are written too, but llama.cpp's deepseek2 loader ignores them (it uses 32/1): pass
yarn_beta_fast/yarn_beta_slow as context parameters (`--yarn-beta-fast 1 --yarn-beta-slow 1`) for K2's 1/1.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from vocab import byte_level_vocab  # this folder is on sys.path (run as a script, or put there by its importers)

from kimi_k2.checkpoint.reader import CheckpointReader
from kimi_k2.config import K2Config

try:
    import gguf
except ImportError:  # the writer needs it; its callers say how to get it
    gguf = None  # type: ignore[assignment]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TOKENIZER = REPO / "models" / "k2-nano-instruct"
TYPES = ("f32", "f16", "q8_0")

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def _need_gguf() -> None:
    if gguf is None:
        raise RuntimeError("the `gguf` package is not installed: `pip install gguf` (it is in the project's `test` "
                           "extra, and `bash benchmarks/cpu_peers/setup.sh gguf` installs it)")


def _names() -> dict[str, str]:
    """Our per-layer suffix -> llama.cpp's name template (from gguf's own table, so a rename there shows up)."""
    T, N = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    return {
        "input_layernorm.weight": N[T.ATTN_NORM] + ".weight",
        "post_attention_layernorm.weight": N[T.FFN_NORM] + ".weight",
        "self_attn.q_proj.weight": N[T.ATTN_Q] + ".weight",
        "self_attn.q_a_proj.weight": N[T.ATTN_Q_A] + ".weight",
        "self_attn.q_a_layernorm.weight": N[T.ATTN_Q_A_NORM] + ".weight",
        "self_attn.q_b_proj.weight": N[T.ATTN_Q_B] + ".weight",
        "self_attn.kv_a_proj_with_mqa.weight": N[T.ATTN_KV_A_MQA] + ".weight",
        "self_attn.kv_a_layernorm.weight": N[T.ATTN_KV_A_NORM] + ".weight",
        "self_attn.o_proj.weight": N[T.ATTN_OUT] + ".weight",
        "mlp.gate_proj.weight": N[T.FFN_GATE] + ".weight",
        "mlp.up_proj.weight": N[T.FFN_UP] + ".weight",
        "mlp.down_proj.weight": N[T.FFN_DOWN] + ".weight",
        "mlp.gate.weight": N[T.FFN_GATE_INP] + ".weight",
        "mlp.gate.e_score_correction_bias": N[T.FFN_EXP_PROBS_B] + ".bias",
        "mlp.shared_experts.gate_proj.weight": N[T.FFN_GATE_SHEXP] + ".weight",
        "mlp.shared_experts.up_proj.weight": N[T.FFN_UP_SHEXP] + ".weight",
        "mlp.shared_experts.down_proj.weight": N[T.FFN_DOWN_SHEXP] + ".weight",
        "self_attn.k_b": N[T.ATTN_K_B] + ".weight",
        "self_attn.v_b": N[T.ATTN_V_B] + ".weight",
        "mlp.experts.gate_proj": N[T.FFN_GATE_EXP] + ".weight",
        "mlp.experts.up_proj": N[T.FFN_UP_EXP] + ".weight",
        "mlp.experts.down_proj": N[T.FFN_DOWN_EXP] + ".weight",
    }


def gguf_tensors(config: K2Config, reader: CheckpointReader) -> Iterator[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) in our layout's order, experts stacked per layer and projection."""
    names = _names()
    top = {"model.embed_tokens.weight": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight",
           "model.norm.weight": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight",
           "lm_head.weight": gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"}
    experts: dict[tuple[int, str], dict[int, np.ndarray]] = {}
    n_exp = config.n_routed_experts or 0
    h, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
    for name, t in reader.tensors(dtype=torch.float32):
        a = t.float().numpy()
        if name in top:
            yield top[name], a
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            raise ValueError(f"tensor {name} has no place in a deepseek2 GGUF")
        bid, rest = int(m.group(1)), m.group(2)
        if (e := _EXPERT.fullmatch(rest)) is not None:
            group = experts.setdefault((bid, e.group(2)), {})
            group[int(e.group(1))] = a
            if len(group) == n_exp:
                stacked = np.stack([group[i] for i in range(n_exp)])  # [experts, out, in]
                del experts[(bid, e.group(2))]
                yield names["mlp.experts." + e.group(2)].format(bid=bid), stacked
        elif rest == "self_attn.kv_b_proj.weight":
            kv_b = a.reshape(h, nope + v, config.kv_lora_rank)
            # k_b transposed per head [h, kv_lora_rank, nope]: ggml reads it as W_UK^T for q_nope @ W_UK absorption
            yield names["self_attn.k_b"].format(bid=bid), np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))
            yield names["self_attn.v_b"].format(bid=bid), np.ascontiguousarray(kv_b[:, nope:])  # [h, v, kv_lora]
        elif rest in names:
            yield names[rest].format(bid=bid), a
        else:
            raise ValueError(f"tensor {name} has no place in a deepseek2 GGUF")
    if experts:
        (bid, proj), got = next(iter(experts.items()))
        raise ValueError(f"layer {bid} {proj}: {len(got)} of {n_exp} routed experts in the checkpoint")


def tensor_type(name: str, a: np.ndarray, want: str) -> gguf.GGMLQuantizationType:
    """llama.cpp's converter rules: 1-D, norms, router and biases f32; the rest in the wanted type."""
    Q = gguf.GGMLQuantizationType
    if want == "f32" or a.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") \
            or ".ffn_gate_inp." in name:
        return Q.F32
    if want == "f16":
        return Q.F16
    return Q.Q8_0 if a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16


def add_metadata(w: gguf.GGUFWriter, config: K2Config, name: str, file_type: str) -> None:
    c = config
    w.add_name(name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    if file_type == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the shared latent
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    if c.q_lora_rank is not None:
        w.add_q_lora_rank(c.q_lora_rank)
    w.add_kv_lora_rank(c.kv_lora_rank)
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    n_dense = c.first_k_dense_replace if c.n_routed_experts is not None else c.num_hidden_layers
    w.add_leading_dense_block_count(n_dense)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.n_routed_experts is not None:
        w.add_expert_count(c.n_routed_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
    w.add_expert_shared_count(c.n_shared_experts or 0)
    w.add_expert_weights_scale(c.routed_scaling_factor)
    if c.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if c.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    rs = c.rope_scaling or {}
    if rs.get("type") == "yarn":
        if float(rs.get("mscale", 1.0)) != float(rs.get("mscale_all_dim", 1.0)):
            raise ValueError("rope_scaling mscale != mscale_all_dim: llama.cpp's deepseek2 has one YaRN mscale")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast", 32.0)))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow", 1.0)))
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rs.get("mscale_all_dim", 0.0)))


def add_vocab(w: gguf.GGUFWriter, config: K2Config, tokenizer_dir: Path) -> None:
    v = byte_level_vocab(tokenizer_dir, config.vocab_size)
    kinds = {"normal": gguf.TokenType.NORMAL, "control": gguf.TokenType.CONTROL, "unused": gguf.TokenType.UNUSED}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("kimi-k2")
    w.add_token_list(v.tokens)
    w.add_token_types([kinds[k] for k in v.kinds])
    w.add_token_merges([f"{a} {b}" for a, b in v.merges])
    if config.bos_token_id is not None:
        w.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        w.add_eos_token_id(config.eos_token_ids[0])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write_gguf(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], file_type: str = "f32",
               tokenizer: str | os.PathLike[str] | None = None) -> Path:
    """Write `checkpoint` (our/HF layout, any stored dtype incl. block-FP8) as `out`; atomically (temp + rename)."""
    _need_gguf()
    if file_type not in TYPES:
        raise ValueError(f"unknown GGUF type {file_type!r}; expected one of {TYPES}")
    ckpt, out = Path(checkpoint), Path(out)
    config = K2Config.from_pretrained(ckpt)
    tok_dir = Path(tokenizer) if tokenizer is not None else (
        ckpt if (ckpt / "tiktoken.model").is_file() else DEFAULT_TOKENIZER)
    if not (tok_dir / "tiktoken.model").is_file():
        raise FileNotFoundError(f"no tiktoken.model in {tok_dir}: llama.cpp needs a vocabulary (give --tokenizer)")
    reader = CheckpointReader(ckpt)
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
    try:
        add_metadata(w, config, ckpt.name, file_type)
        add_vocab(w, config, tok_dir)
        for name, a in gguf_tensors(config, reader):
            qtype = tensor_type(name, a, file_type)
            if qtype == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, a.astype(np.float32, copy=False))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, a.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", default="f32", choices=TYPES)
    ap.add_argument("--tokenizer", type=Path, help=f"dir with tiktoken.model (default: the checkpoint's, else "
                                                   f"{DEFAULT_TOKENIZER.relative_to(REPO)})")
    args = ap.parse_args(argv)
    try:
        path = write_gguf(args.checkpoint, args.out, args.type, args.tokenizer)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"gguf_writer: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.type})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
