"""One engine step on the model: decode rows (1 token each) and prefill chunks run as separate padded forwards,
both through the paged latent cache; logits only for the sequences whose last token was computed."""

from __future__ import annotations

import torch
from torch import nn

from kimi_k2.engine.paged_cache import LatentPool, PagedLatentCache
from kimi_k2.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: nn.Module, pool: LatentPool):
        self.model = model
        self.pool = pool

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute `n` more tokens of each (seq, n) -> (sequences to sample, fp32 logits [len, vocab])."""
        decode = [(seq, n) for seq, n in batch if n == 1]
        prefill = [(seq, n) for seq, n in batch if n > 1]
        seqs: list[Sequence] = []
        logits: list[torch.Tensor] = []
        for group in (decode, prefill):
            if group:
                s, x = self._forward(group)
                if s:
                    seqs += s
                    logits.append(x)
        return seqs, torch.cat(logits) if logits else torch.empty(0)

    def _forward(self, group: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        cache = PagedLatentCache(self.pool, group)
        S = cache.positions.shape[1]
        input_ids = torch.tensor([seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n] + [0] * (S - n)
                                  for seq, n in group])  # [B, S]
        hidden = self.model.model(input_ids, cache.positions, cache)  # [B, S, D]
        rows = [b for b, (seq, n) in enumerate(group) if seq.num_computed_tokens + n == len(seq)]
        if not rows:
            return [], hidden.new_empty(0, 0)
        last = torch.tensor([group[b][1] - 1 for b in rows])
        logits = self.model.lm_head(hidden[torch.tensor(rows), last]).float()  # [M, vocab]
        return [group[b][0] for b in rows], logits
