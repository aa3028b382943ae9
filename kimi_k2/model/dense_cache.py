"""A contiguous (non-paged) LatentCache: the reference the engine's paged cache is tested against.

Usage per forward step: `begin(n_new)` with each sequence's number of real tokens in this step (the step's input is
right-padded to a common length S), run the model with positions = `positions(S)`, then `end()`.
Slot layout: sequence b's tokens live at [0, length_b); this step's tokens are written at length_b + s (padding too,
masked out and overwritten by the next step).
"""

from __future__ import annotations

import torch

from ..config import K2Config


class DenseLatentCache:
    def __init__(
        self, num_layers: int, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
        dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    ) -> None:
        self.c_kv = torch.zeros(num_layers, batch, max_len, kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch, max_len, rope_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.n_new: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, config: K2Config, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> DenseLatentCache:
        c = config
        return cls(c.num_hidden_layers, batch, max_len, c.kv_lora_rank, c.qk_rope_head_dim, dtype, device)

    def positions(self, seq_len: int) -> torch.Tensor:
        """[B, S]: the absolute position of each of this step's slots."""
        return self.lengths[:, None] + torch.arange(seq_len, device=self.lengths.device)

    def begin(self, n_new: torch.Tensor | list[int]) -> None:
        n_new = torch.as_tensor(n_new, dtype=torch.long, device=self.lengths.device)
        if n_new.shape != self.lengths.shape or (n_new < 0).any():
            raise ValueError(f"n_new must be {tuple(self.lengths.shape)} non-negative counts, got {n_new.tolist()}")
        self.n_new, self.mask = n_new, None

    def end(self) -> None:
        if self.n_new is None:
            raise RuntimeError("DenseLatentCache.end() without begin()")
        self.lengths += self.n_new
        self.n_new = self.mask = None

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        if self.n_new is None:
            raise RuntimeError("DenseLatentCache.write() outside begin()/end()")
        B, S, _ = c_kv.shape
        end = int(self.lengths.max()) + S
        if end > self.c_kv.shape[2]:
            raise ValueError(f"cache of {self.c_kv.shape[2]} slots cannot hold {end} tokens")
        slots = self.positions(S)  # [B, S]
        rows = torch.arange(B, device=slots.device)[:, None].expand(B, S)
        self.c_kv[layer_idx, rows, slots] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layer_idx, rows, slots] = k_pe.to(self.k_pe.dtype)
        if self.mask is None:
            self.mask = self._mask(S, end)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.mask is None:
            raise RuntimeError("DenseLatentCache.read() before write()")
        T = self.mask.shape[-1]
        return self.c_kv[layer_idx, :, :T], self.k_pe[layer_idx, :, :T], self.mask

    def _mask(self, S: int, T: int) -> torch.Tensor:
        """[B, S, T]: key t visible to query s iff t <= its position and t is a real token (padded queries see self)."""
        assert self.n_new is not None
        q_pos = self.positions(S)[:, :, None]  # [B, S, 1]
        t = torch.arange(T, device=q_pos.device)
        real = t[None, None] < (self.lengths + self.n_new)[:, None, None]
        visible = ((t <= q_pos) & real) | (t == q_pos)
        return torch.zeros(visible.shape, dtype=torch.float32, device=q_pos.device).masked_fill(~visible, float("-inf"))
