"""The MLA latent cache in fixed-size pages: the engine's side of `kimi_k2.model.cache.LatentCache`.

Per layer one tensor [num_pages * page_size, kv_lora_rank + qk_rope_head_dim]: row `page * page_size + offset`
(a slot) holds token `i`'s [c_kv | k_pe] where page = block_table[i // page_size] and offset = i % page_size.

Attention over the pool (`LatentPool.attention`): "torch" gathers each sequence's slots and runs the model's absorbed
attention (`read`); "triton" (the default on CUDA) lets decode steps (one token per row) run the paged Triton kernel
`kimi_k2.ops.triton.mla_decode` straight over the pages (`attend`), prefill chunks still go through `read`.
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


ATTENTION_BACKENDS = ("torch", "triton")


def default_attention(device: torch.device) -> str:
    """"triton" on CUDA when triton is installed, else "torch"."""
    if device.type != "cuda":
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


class LatentPool:
    def __init__(self, config: K2Config, num_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", attention: str | None = None):
        """attention: one of ATTENTION_BACKENDS (None: `default_attention` of the device). "triton" on the CPU needs
        TRITON_INTERPRET=1 set before the kernel module is first imported (tests)."""
        self.attention = attention or default_attention(torch.device(device))
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        self.decode_kernel = None
        if self.attention == "triton":
            from kimi_k2.ops.triton.mla_decode import mla_decode

            self.decode_kernel = mla_decode
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

    def page_ids(self, rows: list[Row], min_pages: int) -> torch.Tensor:
        """The pages [B, P] holding each row's context (P: the longest's, at least `min_pages`), padded with page 0,
        which a decode step masks past each row's position."""
        n = max(max(-(-r.num_computed_tokens // self.page_size) for r in rows), min_pages)
        return torch.tensor([r.block_table[:n] + [0] * (n - len(r.block_table[:n])) for r in rows])

    def store_decoded(self, rows: list[Row], logits: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Store a decode step's latents [L, B, C + R] (each row's one token) at their slots -> the logits of the rows
        with `last` [M, vocab]."""
        ps = self.page_size
        slots = torch.tensor([r.block_table[r.num_computed_tokens // ps] * ps + r.num_computed_tokens % ps
                              for r in rows])
        self.kv.index_copy_(1, slots, latents)
        if all(r.last for r in rows):
            return logits
        return logits[torch.tensor([b for b, r in enumerate(rows) if r.last], dtype=torch.long)]


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
        self.T, self.mask = T, None
        if pool.decode_kernel is not None and S == 1:  # a decode step: the kernel reads the pages, no mask needed
            self.block_tables, self.context_lens = tables, starts + 1
            self.attend = self._attend_pages
        else:
            self.mask = self._causal_mask()

    def _causal_mask(self) -> torch.Tensor:
        """Additive [B, S, T]: 0 where key t <= the query's position, -inf elsewhere."""
        visible = torch.arange(self.T, device=self.pool.device)[None, None] <= self.positions[:, :, None]
        return torch.zeros(visible.shape, dtype=self.pool.kv.dtype, device=self.pool.device).masked_fill_(
            ~visible, float("-inf"))

    def _attend_pages(self, layer_idx: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        """q_lat [B, H, C], q_pe [B, H, rope] (one query per row) -> o_lat [B, H, C] over each row's pages."""
        return self.pool.decode_kernel(q_lat, q_pe, self.pool.kv[layer_idx], self.block_tables, self.context_lens,
                                       self.pool.page_size, scale, check=False)

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        x = torch.cat([c_kv, k_pe], dim=-1).to(self.pool.kv.dtype)  # [B, S, R + Dr]
        x = x.flatten(0, 1) if self.all_valid else x[self.valid]
        self.pool.kv[layer_idx].index_copy_(0, self.write_slots, x)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool.kv[layer_idx].index_select(0, self.read_slots).view(self.read_shape)  # [B, T, R + Dr]
        r = self.pool.kv_lora_rank
        if self.mask is None:
            self.mask = self._causal_mask()
        return x[..., :r], x[..., r:], self.mask
