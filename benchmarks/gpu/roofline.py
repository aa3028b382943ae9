"""HBM roofline of batched greedy decode: the bytes one step must read, and the fastest that can go.

One decode step of B sequences at context length T reads every weight a token uses once for the whole batch, the
routed experts the batch touches, B embedding rows and each sequence's latent cache:
    bytes = attention + dense MLP + shared experts + routers + norms + lm_head      (all of them, every step)
          + routed experts * E_touched(B) / E                                        (E experts per MoE layer)
          + B * hidden * 2                                                           (embedding rows, bf16)
          + B * T * (kv_lora_rank + rope) * layers * 2                               (bf16 latent cache)
    E_touched(B) = E * (1 - (1 - k/E)^B)      expected distinct experts when B tokens each pick k uniformly
    step time >= bytes / HBM bandwidth,   tokens/s <= B / step time
Weight bytes per precision come from `kimi_k2.model.info.model_info` (fp8: e4m3 projections + an fp32 scale per
128x128 block, the rest bf16). Compute, launch overhead and the routers' real (non-uniform) choices are ignored.
"""

from __future__ import annotations

from kimi_k2.config import K2Config
from kimi_k2.model.info import COMPONENTS, ModelInfo, kv_bytes_per_token, model_info

H200_HBM_BYTES_PER_S = 4.8e12  # NVIDIA H200 SXM: 141 GB HBM3e at 4.8 TB/s
PRECISIONS = ("fp8", "bf16")


def experts_touched(n_experts: int, per_token: int, tokens: int) -> float:
    """Expected distinct experts of one layer that `tokens` tokens use, each picking `per_token` of `n_experts`
    uniformly."""
    return n_experts * (1.0 - (1.0 - per_token / n_experts) ** tokens)


def step_bytes(config: K2Config, batch: int, context: int, precision: str, info: ModelInfo | None = None,
               hbm_bytes_per_s: float = H200_HBM_BYTES_PER_S) -> dict[str, float]:
    """Bytes one decode step of `batch` sequences at `context` tokens reads, and the roofline time and tokens/s."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if batch < 1 or context < 0:
        raise ValueError(f"batch must be >= 1 and context >= 0, got {batch}, {context}")
    info = info or model_info(config)
    parts = info.fp8_component_bytes if precision == "fp8" else info.bf16_component_bytes
    always = sum(parts[c] for c in COMPONENTS if c not in ("routed_experts", "embeddings"))
    routed = 0.0
    if config.n_routed_experts:
        routed = parts["routed_experts"] * experts_touched(
            config.n_routed_experts, config.num_experts_per_tok, batch) / config.n_routed_experts
    embeddings = batch * config.hidden_size * 2
    weights = always + routed + embeddings
    kv = batch * context * kv_bytes_per_token(config)
    seconds = (weights + kv) / hbm_bytes_per_s
    return {"batch": batch, "context": context, "precision": precision, "weight_bytes": weights, "kv_bytes": kv,
            "bytes": weights + kv, "step_s": seconds, "tok_s": batch / seconds}


def roofline_table(config: K2Config, batches: list[int], context: int,
                   hbm_bytes_per_s: float = H200_HBM_BYTES_PER_S) -> list[dict[str, float]]:
    info = model_info(config)
    return [step_bytes(config, b, context, p, info, hbm_bytes_per_s) for p in PRECISIONS for b in batches]
