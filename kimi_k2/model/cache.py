"""The contract between MLA attention (model) and the engine's paged latent cache.

MLA caches one compressed latent c_kv (kv_lora_rank values, after kv_a_layernorm) and one shared, already rotated
RoPE key k_pe (qk_rope_head_dim values) per token and layer: 512 + 64 = 576 values per token per layer at K2 size.
The model owns the math; the engine owns where the values live (pages, block tables).
"""

from __future__ import annotations

from typing import Protocol

import torch


class LatentCache(Protocol):
    def write(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store this step's tokens. c_kv: [B, S, kv_lora_rank], k_pe: [B, S, qk_rope_head_dim] (rotated)."""
        ...

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything each sequence may attend to, this step's tokens included.

        Returns c_kv [B, T, kv_lora_rank], k_pe [B, T, qk_rope_head_dim] and an additive float mask [B, S, T]
        (0 where query s may see key t, -inf elsewhere: causality and padding). Every query row sees at least one
        key, so padded query rows stay finite.

        A cache may also offer `attend(layer_idx, q_lat [B*S, H, C], q_pe [B*S, H, rope], scale) -> o_lat [B*S, H, C]`
        (softmax over the visible keys of q_lat . c_kv + q_pe . k_pe, times c_kv): MLA then calls it instead of
        `read` (the engine's paged decode kernel).
        """
        ...
