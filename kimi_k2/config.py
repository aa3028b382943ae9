"""K2Config: the Hugging Face `config.json` of Kimi K2 / DeepSeek-V3 models, read and written losslessly.

Field names are the published `config.json` keys, so `K2Config.from_pretrained(dir).to_dict()` writes back
a file that Hugging Face `transformers` and vLLM read unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


@dataclass
class K2Config:
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    # MLA: queries through a rank-q_lora_rank bottleneck (None = plain q_proj), keys/values through the
    # kv_lora_rank latent; each head's q/k is [nope part | rope part], the rope key is shared by all heads.
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # MoE
    n_routed_experts: int | None = 384
    n_shared_experts: int | None = 1
    num_experts_per_tok: int | None = 8
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # misc
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    pad_token_id: int | None = None
    num_nextn_predict_layers: int = 0
    quantization_config: dict[str, Any] | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "kimi_k2"
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    # keys of config.json this class does not model (auto_map, use_cache, ...), written back unchanged
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_fp8(self) -> bool:
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8"

    @property
    def is_int4(self) -> bool:
        """Routed experts (the config's targets) stored INT4 in compressed-tensors' pack-quantized format."""
        q = self.quantization_config or {}
        return q.get("quant_method") == "compressed-tensors"

    @property
    def int4_group_size(self) -> int:
        (group,) = (self.quantization_config or {})["config_groups"].values()
        return group["weights"]["group_size"]

    @property
    def weight_block_size(self) -> tuple[int, int]:
        q = self.quantization_config or {}
        return tuple(q.get("weight_block_size", (128, 128)))  # type: ignore[return-value]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek-V3 rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq`-th layer."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale^2 when YaRN extends the context (DeepSeek-V3 `inference/model.py`)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling or {}
        if rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
            factor = float(rs["factor"])
            if factor > 1:
                m = 0.1 * float(rs["mscale_all_dim"]) * math.log(factor) + 1.0
                scale = scale * m * m
        return scale

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid K2 config: {msg}")

        need(
            self.model_type in SUPPORTED_MODEL_TYPES,
            f"unknown model_type {self.model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}",
        )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int")
        need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim must be >= 0")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (rotary pairs)")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or null")
        need(self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} unsupported (K2 uses silu / SwiGLU)")
        if self.n_routed_experts is not None:
            need(self.num_experts_per_tok is not None and 0 < self.num_experts_per_tok <= self.n_routed_experts,
                 "num_experts_per_tok must be in 1..n_routed_experts")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 "n_routed_experts must be divisible by n_group")
            need(1 <= self.topk_group <= self.n_group, "topk_group must be in 1..n_group")
            need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                 "num_experts_per_tok exceeds the experts in topk_group groups")
            need(self.scoring_func in ("sigmoid", "softmax"), f"scoring_func {self.scoring_func!r} unsupported")
            need(self.moe_layer_freq >= 1, "moe_layer_freq must be >= 1")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "default", None), f"rope_scaling type {kind!r} unsupported (K2 uses yarn)")
            if kind == "yarn":
                need("factor" in rs and float(rs["factor"]) >= 1, "yarn rope_scaling needs factor >= 1")
                need("original_max_position_embeddings" in rs,
                     "yarn rope_scaling needs original_max_position_embeddings")
        q = self.quantization_config
        if q is not None and q.get("quant_method") == "compressed-tensors":
            try:
                check_quantization_config(q)
            except ValueError as e:
                need(False, str(e))
        elif q is not None:
            need(q.get("quant_method") == "fp8",
                 f"quant_method {q.get('quant_method')!r} unsupported (fp8, or compressed-tensors INT4)")
            need(q.get("fmt", "e4m3") == "e4m3", f"fp8 fmt {q.get('fmt')!r} unsupported (only e4m3)")
            need(len(q.get("weight_block_size", [128, 128])) == 2, "weight_block_size must have two entries")

    # ---- HF config.json in/out ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> K2Config:
        d = copy.deepcopy(raw)
        if "model_type" not in d:
            raise ValueError("invalid K2 config: config.json has no model_type")
        # transformers >= 5 spells rope settings as `rope_parameters` (theta included, rope_type instead of type)
        if "rope_parameters" in d:
            rp = dict(d.pop("rope_parameters") or {})
            if "rope_theta" in rp:
                d["rope_theta"] = rp.pop("rope_theta")
            kind = rp.get("rope_type", rp.get("type", "default"))
            d["rope_scaling"] = None if kind == "default" else rp
        if d.get("rope_scaling") is not None:
            rs = dict(d["rope_scaling"])
            if "type" not in rs and "rope_type" in rs:
                rs["type"] = rs.pop("rope_type")
            d["rope_scaling"] = None if rs.get("type") == "default" else rs
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "extra"}
        for optional in ("quantization_config", "pad_token_id"):  # absent from the published file when unset
            if d[optional] is None:
                del d[optional]
        d.update(copy.deepcopy(self.extra))
        return dict(sorted(d.items()))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> K2Config:
        """Read `config.json` from a model directory (or the file itself), or build a preset by name."""
        p = Path(path)
        if not p.exists() and str(path) in PRESETS:
            return cls.from_preset(str(path))
        file = p / "config.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {file} (and {str(path)!r} is not a preset: {sorted(PRESETS)})")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        return cls.from_dict(raw)

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        file = out / "config.json"
        file.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return file

    @classmethod
    def from_preset(cls, name: str) -> K2Config:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls.from_dict(PRESETS[name])

    def replace(self, **changes: Any) -> K2Config:
        d = self.to_dict()
        d.update(changes)
        return K2Config.from_dict(d)


_FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

# The published Kimi-K2-Instruct config.json (July 2025), key for key (shared/reference/kimi_k2_formats.md §1.1).
KIMI_K2_INSTRUCT: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 163584,
    "eos_token_id": 163585,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": _FP8,
    "rms_norm_eps": 1e-06,
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.48.3",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}

# 0905: only the YaRN factor changed (32 -> 64), so the context is 4096 * 64 = 256K (§1.3).
KIMI_K2_INSTRUCT_0905 = copy.deepcopy(KIMI_K2_INSTRUCT)
KIMI_K2_INSTRUCT_0905["rope_scaling"]["factor"] = 64.0
KIMI_K2_INSTRUCT_0905["max_position_embeddings"] = 262144

# Kimi-K2-Thinking's quantization_config (shared/reference/kimi_k2_formats.md, "Beyond the seeds"): INT4 weight-only,
# symmetric, groups of 32 inputs, packed eight to an int32 (kimi_k2.checkpoint.int4); every Linear but the ignored
# ones, which leaves the routed experts.
K2_THINKING_INT4_IGNORE = ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
                           r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"]


def int4_quantization_config(group_size: int = 32, ignore: list[str] | None = None) -> dict[str, Any]:
    return {
        "config_groups": {"group_0": {
            "input_activations": None, "output_activations": None, "targets": ["Linear"],
            "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group_size,
                        "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                        "symmetric": True, "type": "int"}}},
        "format": "pack-quantized", "ignore": list(K2_THINKING_INT4_IGNORE if ignore is None else ignore),
        "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
    }


def check_quantization_config(q: dict[str, Any]) -> int:
    """ValueError naming the field unless `q` is a compressed-tensors INT4 config we read -> its group size."""
    if q.get("format") != "pack-quantized":
        raise ValueError(f"compressed-tensors format {q.get('format')!r} unsupported (only pack-quantized)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("compressed-tensors config needs exactly one entry in config_groups")
    (group,) = groups.values()
    w = (group or {}).get("weights") or {}
    for key, want in (("num_bits", 4), ("type", "int"), ("symmetric", True), ("strategy", "group")):
        if w.get(key, want if key == "type" else None) != want:
            raise ValueError(f"compressed-tensors weights.{key} is {w.get(key)!r}; only {want!r} is supported")
    if w.get("actorder") not in (None, False):
        raise ValueError(f"compressed-tensors weights.actorder {w['actorder']!r} unsupported (g_idx)")
    g = w.get("group_size")
    if not isinstance(g, int) or g <= 0:
        raise ValueError(f"compressed-tensors weights.group_size must be a positive int, got {g!r}")
    if group.get("input_activations") is not None:
        raise ValueError("compressed-tensors input_activations quantization unsupported (weight-only INT4 only)")
    if not isinstance(group.get("targets", []), list) or not isinstance(q.get("ignore", []), list):
        raise ValueError("compressed-tensors targets and ignore must be lists of module names or 're:' patterns")
    return g


# Kimi-K2-Thinking (Nov 2025): the 0905 architecture and 256K context, its routed experts INT4 from quantization-aware
# training, everything else bf16. Fields beyond the quantization_config are 0905's (no stored copy of the Thinking
# config.json was found; the model card's summary table matches 0905's).
KIMI_K2_THINKING = copy.deepcopy(KIMI_K2_INSTRUCT_0905)
KIMI_K2_THINKING["quantization_config"] = int4_quantization_config()


def _small(**over: Any) -> dict[str, Any]:
    """A K2-shaped config with small widths: every architectural feature present, fp32 weights."""
    base: dict[str, Any] = {
        "model_type": "kimi_k2",
        "architectures": ["DeepseekV3ForCausalLM"],
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.827,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 1024,
        "rope_theta": 50000.0,
        "rope_scaling": {
            "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256,
            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }
    base.update(over)
    return base


PRESETS: dict[str, dict[str, Any]] = {
    "kimi-k2-instruct": KIMI_K2_INSTRUCT,
    "kimi-k2-instruct-0905": KIMI_K2_INSTRUCT_0905,
    "kimi-k2-thinking": KIMI_K2_THINKING,
    # unit tests: every feature, tiny widths
    "k2-tiny": _small(),
    # the shipped models/k2-nano-*: every K2 feature at 5.1M parameters (3.8M active), vocab 6144 BPE + 256 specials
    "k2-nano": _small(
        vocab_size=6400, bos_token_id=6144, eos_token_id=6145, hidden_size=192, intermediate_size=512,
        moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8,
        num_experts_per_tok=2, max_position_embeddings=4096,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # benchmarks: the K2 shape at a few tens of millions of parameters
    "k2-small": _small(
        vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=4096,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    # CPU benchmarks against llama.cpp and vLLM-CPU (benchmarks/cpu_peers/): 287M parameters (94M read per decoded
    # token: the weights, not per-op overhead, dominate a step), 8 layers (1 dense + 7 MoE, 64 routed experts top-6 +
    # 1 shared), K2's per-head dims and its real 576-wide MLA latent (kv_lora_rank 512 + rope 64, which vLLM-CPU's MLA
    # kernel requires), vocab 32768 (room for the k2-nano tokenizer's 6400 ids, whose [BOS]/[EOS] ids it uses)
    "k2-medium": _small(
        vocab_size=32768, bos_token_id=6144, eos_token_id=6145, hidden_size=1024, intermediate_size=2816,
        moe_intermediate_size=128, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=512,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        num_experts_per_tok=6, max_position_embeddings=4096,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
}
