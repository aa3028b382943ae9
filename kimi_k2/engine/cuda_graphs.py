"""Decode steps replayed as CUDA graphs, one per batch-size bucket (as vLLM and nano-vllm capture them).

A decode step (every row computes one token) is padded to the smallest bucket that holds it (`capture_sizes`: 1, 2,
4, 8, then every 8 up to max_num_seqs) and runs from static buffers (`DecodeInputs`): token ids, positions, the
slot each row's latents go to, block tables and context lengths. Padding rows compute token 0 at position 0 over a
scratch page the block manager never hands out, so their writes touch no sequence and their logits are dropped.
Attention is the paged Triton kernel without host checks (`mla_decode(check=False)`); the model runs its modules
directly (`decode_logits`), skipping K2Model's input validation (a host sync; the engine checked the ids at
admission). Everything in the step is then free of host syncs and fixed in shape per bucket: captured once, it
replays with one launch. Steps larger than the largest bucket, prefill chunks and mixed batches run eagerly.

On the CPU (tests) the same buffers, padding and forward run eagerly (`use_graphs=False`): only the capture itself
needs CUDA.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kimi_k2.engine.paged_cache import LatentPool, Row

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch-size buckets: 1, 2, 4, 8, 16, 24, ... (every 8), the last one max_num_seqs itself."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


def bucket_for(n: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding n rows, or None (run eagerly)."""
    return next((s for s in sizes if s >= n), None) if n >= 1 else None


class DecodeInputs:
    """Static per-step inputs for up to `max_batch` decode rows over block tables of `max_pages` pages."""

    def __init__(self, max_batch: int, max_pages: int, page_size: int, scratch_page: int, device: torch.device):
        self.page_size, self.scratch_page, self.max_pages = page_size, scratch_page, max_pages
        self.input_ids = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.write_slots = torch.full((max_batch,), scratch_page * page_size, dtype=torch.long, device=device)
        self.block_tables = torch.full((max_batch, max_pages), scratch_page, dtype=torch.long, device=device)
        self.context_lens = torch.ones(max_batch, dtype=torch.long, device=device)

    def fill(self, rows: list[Row], bucket: int) -> None:
        """Rows 0..len(rows)-1 from `rows` (one token each), rows up to `bucket` padding; one copy per buffer."""
        ps, pad = self.page_size, bucket - len(rows)
        if pad < 0 or any(len(r.input_ids) != 1 for r in rows):
            raise ValueError(f"decode inputs: {len(rows)} rows of one token each must fit the bucket of {bucket}")
        pos = [r.num_computed_tokens for r in rows]
        if pos and max(pos) // ps >= self.max_pages:
            raise ValueError(f"decode inputs: position {max(pos)} is past the {self.max_pages} pages of a table")
        tables = [r.block_table[: self.max_pages] + [self.scratch_page] * (self.max_pages - len(r.block_table))
                  for r in rows] + [[self.scratch_page] * self.max_pages] * pad
        slots = [r.block_table[p // ps] * ps + p % ps for r, p in zip(rows, pos, strict=True)]
        host = {"input_ids": [[r.input_ids[0]] for r in rows] + [[0]] * pad,
                "positions": [[p] for p in pos] + [[0]] * pad,
                "write_slots": slots + [self.scratch_page * ps] * pad,
                "block_tables": tables, "context_lens": [p + 1 for p in pos] + [1] * pad}
        for name, values in host.items():
            getattr(self, name)[:bucket].copy_(torch.tensor(values), non_blocking=True)


class StaticDecodeCache:
    """The LatentCache of a decode step over the first `b` rows of `DecodeInputs` (paged kernel, no host sync)."""

    def __init__(self, pool: LatentPool, inputs: DecodeInputs, b: int):
        if pool.decode_kernel is None:
            raise ValueError("graphed decode needs the paged decode kernel (attention backend 'triton')")
        self.pool, self.b = pool, b
        self.slots, self.tables, self.lens = inputs.write_slots[:b], inputs.block_tables[:b], inputs.context_lens[:b]

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        x = torch.cat([c_kv, k_pe], dim=-1).to(self.pool.kv.dtype).flatten(0, 1)  # [b, R + Dr]
        self.pool.kv[layer_idx].index_copy_(0, self.slots, x)

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise RuntimeError("the graphed decode step attends through `attend` only (MLA.track_max_logits is for "
                           "training forwards)")

    def attend(self, layer_idx: int, q_lat: torch.Tensor, q_pe: torch.Tensor, scale: float) -> torch.Tensor:
        return self.pool.decode_kernel(q_lat, q_pe, self.pool.kv[layer_idx], self.tables, self.lens,
                                       self.pool.page_size, scale, check=False)


def decode_logits(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, cache: StaticDecodeCache
                  ) -> torch.Tensor:
    """K2ForCausalLM's forward over [b, 1] tokens without the input checks -> fp32 logits [b, vocab]."""
    m = model.model
    h = m.embed_tokens(input_ids)
    cos, sin = m.rotary(positions, h.dtype)
    for layer in m.layers:
        h = layer(h, cos, sin, cache)
    return model.lm_head(m.norm(h)[:, 0]).float()


class DecodeGraphs:
    """Decode steps of up to max_num_seqs rows through per-bucket CUDA graphs (or, use_graphs=False, the same
    static-buffer forward run eagerly). The pool's page `scratch_page` must be outside the block manager's pages."""

    def __init__(self, model: nn.Module, pool: LatentPool, max_num_seqs: int, max_model_len: int, scratch_page: int,
                 use_graphs: bool = True):
        if not 0 <= scratch_page < pool.num_pages:
            raise ValueError(f"scratch page {scratch_page} is not a page of the pool (0..{pool.num_pages - 1})")
        self.model, self.pool, self.use_graphs = model, pool, use_graphs
        self.sizes = capture_sizes(max_num_seqs)
        max_pages = -(-max_model_len // pool.page_size)
        self.inputs = DecodeInputs(self.sizes[-1], max_pages, pool.page_size, scratch_page, pool.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _run(self, b: int) -> torch.Tensor:
        i = self.inputs
        return decode_logits(self.model, i.input_ids[:b], i.positions[:b], StaticDecodeCache(self.pool, i, b))

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool (inputs all padding: scratch writes only)."""
        if not self.use_graphs:
            return
        mempool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            self.inputs.fill([], b)
            self._run(b)  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[b] = self._run(b)
            self.graphs[b] = graph
        torch.cuda.synchronize()

    @torch.inference_mode()
    def __call__(self, rows: list[Row]) -> torch.Tensor | None:
        """fp32 logits [len(rows), vocab] of a decode step, or None when no bucket holds it (run it eagerly)."""
        b = bucket_for(len(rows), self.sizes)
        if b is None or any(len(r.input_ids) != 1 or not r.last for r in rows):
            return None
        self.inputs.fill(rows, b)
        if not self.use_graphs:
            return self._run(b)[: len(rows)]
        self.graphs[b].replay()
        return self.outputs[b][: len(rows)].clone()
