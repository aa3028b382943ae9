"""One engine step on the model: decode rows (1 token each) and prefill chunks run as separate padded forwards,
both through the paged latent cache; logits only for the sequences whose last token was computed.

`run` turns the scheduled sequences into plain `Row`s and hands them to `forward_fn`: `forward` in this process, or,
when the model is split over ranks (`kimi-k2 serve --ep N`), `DistributedRunner.step`, which broadcasts the rows so
every rank runs `forward` in lockstep on its own copy of the page pool. Sampling stays with the caller.
With a `CompiledDecoder` (`EngineConfig.compile_decode`, the CPU), a group of decode rows runs through it instead;
with `DecodeGraphs` (`EngineConfig.cuda_graphs`, CUDA) a group of decode rows replays the graph of its batch bucket.
A model they cannot serve, or a compile or capture that fails, falls back to the eager model with a logged warning.
Every tensor a step makes is made on the pool's device (the model's): the host sends token ids and positions, and
gets back logits.
The runner prepares the model for inference in place: routed experts of float weights run as grouped GEMMs
(`kimi_k2.model.grouped_experts`; same modules and state_dict, their weights stacked without a copy).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from kimi_k2.engine.cuda_graphs import DecodeGraphs
from kimi_k2.engine.paged_cache import LatentPool, PagedLatentCache, Row
from kimi_k2.engine.sequence import Sequence
from kimi_k2.model.grouped_experts import GroupedExperts, groupable
from kimi_k2.model.moe import Experts, MoE

if TYPE_CHECKING:  # imported where used: compiled_decode imports dynamo, which the "aoti" backend keeps out
    from kimi_k2.engine.aot_decode import AotDecoder
    from kimi_k2.engine.compiled_decode import CompiledDecoder

log = logging.getLogger(__name__)


def grouped_gemm_runs(experts: nn.Module) -> bool:
    """The grouped experts run these weights: any float dtype or CPU quantized format (its buffers) on the CPU; bf16 on
    CUDA (sm90+, torch._grouped_mm's kernel)."""
    w = next(itertools.chain(experts.parameters(), experts.buffers()))
    if w.device.type == "cpu":
        return True
    cuda = w.device.type == "cuda"
    return cuda and w.dtype == torch.bfloat16 and torch.cuda.get_device_capability(w.device) >= (9, 0)


class ModelRunner:
    def __init__(self, model: nn.Module, pool: LatentPool, compile_decode: bool = False,
                 decode_backend: str = "inductor"):
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            if type(moe.experts) is Experts and groupable(moe.experts) and grouped_gemm_runs(moe.experts):
                moe.experts = GroupedExperts(moe.experts)
        self.model = model
        self.pool = pool
        self.decoder = self._compiled_decoder(model, pool, decode_backend) if compile_decode else None
        self.graphs: DecodeGraphs | None = None
        self.forward_fn: Callable[[list[list[Row]]], torch.Tensor] = self.forward

    @staticmethod
    def _compiled_decoder(model: nn.Module, pool: LatentPool, backend: str) -> CompiledDecoder | AotDecoder | None:
        if backend == "aoti":
            from kimi_k2.engine.aot_decode import AotDecoder

            try:
                aot = AotDecoder(model, pool)
                aot.warm_up()
            except Exception as e:  # a model it cannot run, no C++ compiler, a failed build: the eager path
                log.warning("AOTInductor decode off, decoding with the eager model: %s", e)
                return None
            return aot
        from kimi_k2.engine.compiled_decode import CompiledDecoder, unsupported

        reason = unsupported(model, pool)
        if reason is not None:
            log.warning("compiled decode off, decoding with the eager model: %s", reason)
            return None
        decoder = CompiledDecoder(model, pool)
        try:
            decoder.warm_up()
        except Exception as e:  # inductor needs a working C++ compiler; any failure leaves the eager path
            log.warning("compiled decode off, decoding with the eager model: torch.compile failed: %s", e)
            return None
        return decoder

    def use_decode_graphs(self, max_num_seqs: int, max_model_len: int, scratch_page: int) -> None:
        """Decode steps through `DecodeGraphs` (captured now on CUDA; on the CPU the same step runs eagerly)."""
        try:
            graphs = DecodeGraphs(self.model, self.pool, max_num_seqs, max_model_len, scratch_page,
                                  use_graphs=self.pool.device.type == "cuda")
            graphs.capture()
        except Exception as e:  # a capture failure (an op that syncs, a driver limit) leaves the eager path
            log.warning("CUDA graphs off, decoding with the eager model: %s", e)
            return
        self.graphs = graphs

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute `n` more tokens of each (seq, n) -> (sequences to sample, fp32 logits [len, vocab])."""
        groups = [g for g in ([(s, n) for s, n in batch if n == 1], [(s, n) for s, n in batch if n > 1]) if g]
        if not groups:
            return [], torch.empty(0, device=self.pool.device)
        rows = [[Row(seq.token_ids[seq.num_computed_tokens:seq.num_computed_tokens + n], seq.num_computed_tokens,
                     seq.block_table, seq.num_computed_tokens + n == len(seq)) for seq, n in g] for g in groups]
        seqs = [seq for g in groups for seq, n in g if seq.num_computed_tokens + n == len(seq)]
        return seqs, self.forward_fn(rows)

    @torch.inference_mode()
    def forward(self, groups: list[list[Row]]) -> torch.Tensor:
        """One padded forward per group -> fp32 logits [rows with `last`, vocab], in group then row order."""
        return torch.cat([self._forward(rows) for rows in groups])

    def _forward(self, rows: list[Row]) -> torch.Tensor:
        if self.decoder is not None and all(len(r.input_ids) == 1 for r in rows) and \
                (logits := self.decoder(rows)) is not None:
            return logits
        if self.graphs is not None and (logits := self.graphs(rows)) is not None:
            return logits
        cache = PagedLatentCache(self.pool, rows)
        S, dev = cache.positions.shape[1], self.pool.device
        input_ids = torch.tensor([r.input_ids + [0] * (S - len(r.input_ids)) for r in rows], device=dev)  # [B, S]
        hidden = self.model.model(input_ids, cache.positions, cache)  # [B, S, D]
        last = [b for b, r in enumerate(rows) if r.last]
        ends = torch.tensor([len(rows[b].input_ids) - 1 for b in last], dtype=torch.long, device=dev)
        return self.model.lm_head(hidden[torch.tensor(last, dtype=torch.long, device=dev), ends]).float()  # [M, V]
