"""The MLA latent cache in fixed-size pages: the engine's side of `kimi_k2.model.cache.LatentCache`.

Per layer one tensor [num_pages * page_size, kv_lora_rank + qk_rope_head_dim]: row `page * page_size + offset`
(a slot) holds token `i`'s [c_kv | k_pe] where page = block_table[i // page_size] and offset = i % page_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kimi_k2.config import K2Config


@dataclass
class Row:
    """What one forward needs of one sequence (plain data, so it can be broadcast to other ranks)."""

    input_ids: list[int]  # the tokens to compute now
    num_computed_tokens: int  # position of input_ids[0]: tokens before it are in the cache
    block_table: list[int]  # the sequence's page ids, covering at least num_computed_tokens + len(input_ids)
    last: bool  # input_ids end at the sequence's last token: its logits are wanted


class LatentPool:
    def __init__(self, config: K2Config, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        self.kv_lora_rank = config.kv_lora_rank
        self.page_size = page_size
        self.num_pages = num_pages
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = torch.zeros(config.num_hidden_layers, num_pages * page_size, width, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def bytes_per_token(self) -> int:
        return self.kv.shape[0] * self.kv.shape[2] * self.kv.element_size()


class PagedLatentCache:
    """One forward's view of the pool: row b computes tokens [start_b, start_b + n_b) (rows padded to S)."""

    def __init__(self, pool: LatentPool, batch: list[Row]):
        """Sizes come from the rows (host ints), index tensors are made on the pool's device: no device sync."""
        self.pool = pool
        ps, dev = pool.page_size, pool.device
        lens_list = [len(r.input_ids) for r in batch]
        S, T = max(lens_list), max(r.num_computed_tokens + len(r.input_ids) for r in batch)
        num_pages = -(-T // ps)
        starts = torch.tensor([r.num_computed_tokens for r in batch], device=dev)  # [B]
        lens = torch.tensor(lens_list, device=dev)  # [B]
        tables = torch.tensor([r.block_table[:num_pages] + [0] * (num_pages - len(r.block_table[:num_pages]))
                               for r in batch], device=dev)  # [B, P]
        # slot of every key position t < T (positions past a sequence's end point into page 0; they are masked)
        self.key_slots = (tables[:, :, None] * ps + torch.arange(ps, device=dev)).flatten(1)[:, :T]  # [B, T]
        self.read_slots, self.read_shape = self.key_slots.flatten(), (len(batch), T, -1)
        s = torch.arange(S, device=dev)
        self.valid = s[None] < lens[:, None]  # [B, S]
        # padded query rows repeat the last real position: same keys, finite output, discarded
        self.positions = starts[:, None] + torch.minimum(s[None], lens[:, None] - 1)  # [B, S]
        write_slots = self.key_slots.gather(1, self.positions)  # [B, S]
        self.all_valid = all(n == S for n in lens_list)
        self.write_slots = write_slots.flatten() if self.all_valid else write_slots[self.valid]
        visible = torch.arange(T, device=dev)[None, None] <= self.positions[:, :, None]  # [B, S, T], causal
        self.mask = torch.zeros(visible.shape, dtype=pool.kv.dtype, device=dev).masked_fill_(~visible, float("-inf"))

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        x = torch.cat([c_kv, k_pe], dim=-1).to(self.pool.kv.dtype)  # [B, S, R + Dr]
        x = x.flatten(0, 1) if self.all_valid else x[self.valid]
        self.pool.kv[layer_idx].index_copy_(0, self.write_slots, x)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool.kv[layer_idx].index_select(0, self.read_slots).view(self.read_shape)  # [B, T, R + Dr]
        r = self.pool.kv_lora_rank
        return x[..., :r], x[..., r:], self.mask
