"""Compiled single-stream decode (`EngineConfig(compile_decode=True)`, on by default in `kimi-k2 serve/generate`).

A step whose whole batch is one sequence computing one token runs `kimi_k2.model.decode.DecodeStep` as one
torch.compile'd graph (inductor, C++ wrapper) instead of the eager model: the same functions in a few fused C++ loops
and BLAS calls instead of ~80 eager ops per layer. The graph reads the latent page pool through the sequence's pages;
their number and the pool's size are its only dynamic sizes (at least 2 pages are passed, so it never specializes),
so it compiles once per process and model config, at engine start-up (`warm_up`), and inductor's on-disk caches
(FX graph and AOTAutograd, on by default) make a later process's compile a cache hit. This token's latents come back
out and are stored here. Every other step (prefill, batches) runs the eager model.

The weights are laid out in place first (`prepare_decode_layout`: projections that read the same input fused and
transposed, the routed experts stacked; each module's weight becomes a view), so the graph reads them without a second
copy of anything.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import torch
from torch import nn

from kimi_k2.config import K2Config
from kimi_k2.engine.paged_cache import LatentPool, Row
from kimi_k2.model.decode import DecodeStep, DecodeWeights, check_decode_model, decode_weights, prepare_decode_layout

log = logging.getLogger(__name__)


def unsupported(model: nn.Module, pool: LatentPool) -> str | None:
    """Why the compiled decode cannot serve this model and pool, or None."""
    try:
        check_decode_model(model)
    except ValueError as e:
        return str(e)
    if pool.kv.dtype != torch.float32:
        return f"compiled decode needs a float32 latent cache, got {pool.kv.dtype}"
    if pool.device.type != "cpu":
        return f"compiled decode is the CPU path (inductor's C++ wrapper), the engine runs on {pool.device}"
    return None


_COMPILED: dict[tuple[str, float, int], Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def compiled_step(config: K2Config, attention_factor: float, page_size: int) -> Callable[..., tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
    """One torch.compile'd DecodeStep per model config and page size in this process: later engines reuse its graph."""
    key = (json.dumps(config.to_dict(), sort_keys=True), attention_factor, page_size)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(DecodeStep(config, attention_factor, page_size), fullgraph=True,
                                       dynamic=False, options={"cpp_wrapper": True})
    return _COMPILED[key]


class CompiledDecoder:
    def __init__(self, model: nn.Module, pool: LatentPool):
        check_decode_model(model)
        if pool.kv.dtype != torch.float32:
            raise ValueError(f"compiled decode needs a float32 latent cache, got {pool.kv.dtype}")
        self.model, self.pool = model, pool
        prepare_decode_layout(model)
        self.step = compiled_step(model.config, model.model.rotary.attention_factor, pool.page_size)
        self.compile_seconds: float | None = None  # wall time of the first call (trace + inductor + C++ build)
        self._watched: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor | None, int]] = []
        self._weights: DecodeWeights | None = None

    def _snapshot(self) -> None:
        """Every parameter and buffer slot of the model with the tensor (and memory) it holds now."""
        self._watched = [(tensors, name, t, 0 if t is None else t.data_ptr())
                         for m in self.model.modules() for tensors in (m._parameters, m._buffers)
                         for name, t in tensors.items()]

    def weights(self) -> DecodeWeights:
        """`decode_weights(model)`, rebuilt whenever a tensor of the model is replaced (in-place updates write the
        tensors the graph already reads: the fused and packed weights are views). The check is one identity and
        pointer comparison per tensor (walking the module tree every step cost ~1 ms, a quarter of a k2-small step)."""
        if self._weights is None or any(tensors.get(name) is not t or (t is not None and t.data_ptr() != ptr)
                                        for tensors, name, t, ptr in self._watched):
            self._weights = decode_weights(self.model)
            self._snapshot()
        return self._weights

    def _run(self, token: int, pos: int, block_table: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        ps = self.pool.page_size
        n = max(-(-pos // ps), 2)  # the pages holding the cached tokens, padded with page 0 (masked) to >= 2
        pages = torch.tensor([block_table[:n] + [0] * (n - len(block_table[:n]))])  # [1, n]
        args = (self.weights(), torch.tensor([token]), torch.tensor([pos]), pages, self.pool.kv)
        if self.compile_seconds is not None:
            return self.step(*args)
        torch._dynamo.mark_dynamic(pages, 1)
        torch._dynamo.mark_dynamic(self.pool.kv, 1)  # pools of any size share the graph
        start = time.perf_counter()
        out = self.step(*args)
        self.compile_seconds = time.perf_counter() - start
        return out

    def warm_up(self) -> None:
        """Compile now (a token at position 0 over page 0; nothing is stored), not on the first request."""
        with torch.inference_mode():
            self._run(0, 0, [0])
        log.info("compiled decode ready: first call (trace, inductor, C++ build or cache hit) took %.1f s",
                 self.compile_seconds)

    def __call__(self, row: Row) -> torch.Tensor:
        """Compute row's one token and store its latents -> fp32 logits [1, vocab]."""
        ps, pos = self.pool.page_size, row.num_computed_tokens
        logits, latents = self._run(row.input_ids[0], pos, row.block_table)
        self.pool.kv[:, row.block_table[pos // ps] * ps + pos % ps] = latents[:, 0]
        return logits
