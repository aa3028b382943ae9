"""Opt-in compiled single-stream decode (`EngineConfig(compile_decode=True)`).

A step whose whole batch is one sequence computing one token runs `kimi_k2.model.decode.DecodeStep` as one
torch.compile'd graph (inductor, C++ wrapper) instead of the eager model: the same math in a few fused C++ loops
and BLAS calls instead of ~80 eager ops per layer. The graph reads the latent page pool through the sequence's pages;
their number and the pool's size are its only dynamic sizes (at least 2 pages are passed, so it never specializes),
so it compiles once per process and model config. This token's latents come back out and are stored here.
Every other step (prefill, batches) runs the eager model.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from kimi_k2.engine.paged_cache import LatentPool, Row
from kimi_k2.model.decode import DecodeStep, DecodeWeights, check_decode_model, decode_weights


class CompiledDecoder:
    def __init__(self, model: nn.Module, pool: LatentPool):
        check_decode_model(model)
        if pool.kv.dtype != torch.float32:
            raise ValueError(f"compiled decode needs a float32 latent cache, got {pool.kv.dtype}")
        self.model, self.pool = model, pool
        step = DecodeStep(model.config, model.model.rotary.attention_factor, pool.page_size)
        self.step = torch.compile(step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
        self.compile_seconds: float | None = None  # wall time of the first call (trace + inductor + C++ build)
        self._slots = [d for m in model.modules() for d in (m._parameters, m._buffers) if d]  # where tensors live
        self._key: list[tuple[int, int]] | None = None
        self._weights: DecodeWeights | None = None

    def weights(self) -> DecodeWeights:
        """`decode_weights(model)`, rebuilt whenever a tensor of the model is replaced or updated in place."""
        try:
            key = [(t.data_ptr(), t._version) for d in self._slots for t in d.values() if t is not None]
        except RuntimeError:  # inference tensors have no version counter: rebuild every time
            key = None
        if key is None or key != self._key or self._weights is None:
            self._weights, self._key = decode_weights(self.model), key
        return self._weights

    def __call__(self, row: Row) -> torch.Tensor:
        """Compute row's one token and store its latents -> fp32 logits [1, vocab]."""
        ps, pos = self.pool.page_size, row.num_computed_tokens
        n = max(-(-pos // ps), 2)  # the pages holding the cached tokens, padded with page 0 (masked) to >= 2
        pages = torch.tensor(row.block_table[:n] + [0] * (n - len(row.block_table[:n])))
        args = (self.weights(), torch.tensor(row.input_ids), torch.tensor(pos), pages, self.pool.kv)
        if self.compile_seconds is None:
            torch._dynamo.mark_dynamic(pages, 0)
            torch._dynamo.mark_dynamic(self.pool.kv, 1)  # pools of any size share the graph
            start = time.perf_counter()
            try:
                logits, latents = self.step(*args)
            except Exception as e:  # inductor needs a working C++ compiler (g++) on this machine
                raise RuntimeError(f"compile_decode: torch.compile of the decode step failed: {e}") from e
            self.compile_seconds = time.perf_counter() - start
        else:
            logits, latents = self.step(*args)
        self.pool.kv[:, row.block_table[pos // ps] * ps + pos % ps] = latents
        return logits
