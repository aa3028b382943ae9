"""Compiled decode (`EngineConfig(compile_decode=True)`, on by default in `kimi-k2 serve/generate`).

A step whose rows each compute one token (a decode step, of one sequence or a batch of them) runs
`kimi_k2.model.decode.DecodeStep` as one torch.compile'd graph (inductor, C++ wrapper) instead of the eager model: the
same functions in a few fused C++ loops and BLAS calls instead of ~80 eager ops per layer. The graph reads the latent
page pool through each sequence's pages. Two graphs per process and model config: one for a single sequence (batch
fixed at 1), compiled at engine start-up (`warm_up`), and one for batches whose size B >= 2 is a dynamic size, so
every batch up to max_num_seqs shares it. The batched graph is compiled in a background thread from the engine's
first batch on (an engine that never batches never builds it); until it is ready, batches run the eager model. One
graph for both was measured and not taken: an unbacked batch size (`mark_unbacked`, which does not specialize 1) cost
2% (fp32) and 7% (int8) of a single-sequence k2-small step, side by side. Their other dynamic sizes are the number
of pages (the longest context of the batch; at least 2 are passed, so it never specializes) and the pool's size.
Inductor's on-disk caches (FX graph and AOTAutograd, on by default) make a later process's compile a cache hit (dynamo's
trace still runs: ~15 s of CPU on k2-small). The step's latents come back out and are stored here. Prefill chunks run
the eager model.

The weights are laid out in place first (`prepare_decode_layout`: projections that read the same input fused and
transposed, the routed experts stacked; each module's weight becomes a view), so the graph reads them without a second
copy of anything.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.types import GuardFilterEntry

from kimi_k2.config import K2Config
from kimi_k2.engine.decode_inputs import WatchedWeights
from kimi_k2.engine.paged_cache import LatentPool, Row
from kimi_k2.model.decode import DecodeStep, DecodeWeights, check_decode_model, prepare_decode_layout

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


def guards_to_keep(entries: list[GuardFilterEntry]) -> list[bool]:
    """Of dynamo's guards drop those on module globals, which nothing rebinds (with them a k2-small step took ~0.4 ms
    more of ~3.5 ms); keep the rest: the tensor guards (dtype, device, static sizes and strides of the inputs and of
    every weight, which also tell a quantized model's `Packed` tuples from an fp32 tensor), the weight dict's structure
    (which optional weights, e.g. attention biases, a model has: without these guards a model with biases ran the
    graph of one without, measured to cost 0.4% of a k2-small step), the shape relations and the DecodeStep's config
    constants."""
    return [not e.is_global for e in entries]


_COMPILED: dict[tuple[str, float, int], Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {}


def compiled_step(config: K2Config, attention_factor: float, page_size: int) -> Callable[..., tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
    """One torch.compile'd DecodeStep per model config and page size in this process: later engines reuse its graphs
    (one for a single sequence, one for batches)."""
    key = (json.dumps(config.to_dict(), sort_keys=True), attention_factor, page_size)
    if key not in _COMPILED:
        # every DecodeStep shares one code object, and each config, weight format and batch graph is one entry of
        # dynamo's cache for it: past the default limit (8) a new model in this process would fail to compile
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _COMPILED[key] = torch.compile(DecodeStep(config, attention_factor, page_size), fullgraph=True, dynamic=False,
                                       options={"cpp_wrapper": True, "guard_filter_fn": guards_to_keep})
    return _COMPILED[key]


class CompiledDecoder:
    def __init__(self, model: nn.Module, pool: LatentPool):
        check_decode_model(model)
        if pool.kv.dtype != torch.float32:
            raise ValueError(f"compiled decode needs a float32 latent cache, got {pool.kv.dtype}")
        self.model, self.pool = model, pool
        prepare_decode_layout(model)
        self.step = compiled_step(model.config, model.model.rotary.attention_factor, pool.page_size)
        # wall time of each graph's first call (trace, inductor, C++ build): False one sequence, True batches
        self.compile_seconds: dict[bool, float] = {}
        self._weights = WatchedWeights(model)
        self._batch_compile: threading.Thread | None = None

    def weights(self) -> DecodeWeights:
        return self._weights.current()[0]

    def _run(self, rows: list[Row], weights: DecodeWeights | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token of each of B rows -> (logits [B, vocab], latents [L, B, C + R])."""
        pages = self.pool.page_ids(rows, min_pages=2)  # >= 2 pages: the page count never specializes
        tokens, positions = [r.input_ids[0] for r in rows], [r.num_computed_tokens for r in rows]
        token_ids, pos = torch.tensor(tokens), torch.tensor(positions)
        batched = len(tokens) > 1
        args = (self.weights() if weights is None else weights, token_ids, pos, pages, self.pool.kv)
        if batched in self.compile_seconds:
            return self.step(*args)
        torch._dynamo.mark_dynamic(pages, 1)
        torch._dynamo.mark_dynamic(self.pool.kv, 1)  # pools of any size share the graph
        if batched:
            for t in (token_ids, pos, pages):
                torch._dynamo.mark_dynamic(t, 0)  # B >= 2: dynamo assumes sizes are not 0 or 1
        start = time.perf_counter()
        out = self.step(*args)
        self.compile_seconds[batched] = time.perf_counter() - start
        return out

    def warm_up(self) -> None:
        """Compile the single-sequence graph now (a token at position 0 over page 0; nothing is stored), not on the
        first request."""
        with torch.inference_mode():
            self._run([Row([0], 0, [0], True)])
        log.info("compiled decode ready: the first call (trace, inductor, C++ build or cache hit) took %.1f s",
                 self.compile_seconds[False])

    def compile_batched(self, weights: DecodeWeights | None = None) -> None:
        """Compile the batched graph (two tokens at position 0 over page 0; nothing is stored)."""
        with torch.inference_mode():
            self._run([Row([0], 0, [0], True)] * 2, weights)
        log.info("compiled decode of batches ready: the first call took %.1f s", self.compile_seconds[True])

    def _compile_batched_or_warn(self, weights: DecodeWeights) -> None:
        try:
            self.compile_batched(weights)
        except Exception as e:  # batches keep running the eager model
            log.warning("compiled decode of batches off, batches run the eager model: torch.compile failed: %s", e)

    def batched_ready(self) -> bool:
        """Whether the batched graph runs batches; if not, start its compile in the background (once)."""
        if True in self.compile_seconds:
            return True
        if self._batch_compile is None:
            # the weight dict is built by the caller, whose thread alone ever rebuilds it. Not a daemon: a process that
            # ends while it compiles waits for it (a daemon thread stopped mid-compile aborted the interpreter at exit),
            # and the graph lands in inductor's on-disk cache for the next process
            self._batch_compile = threading.Thread(target=self._compile_batched_or_warn, args=(self.weights(),),
                                                   name="compile-batched-decode")
            self._batch_compile.start()
        return False

    def wait_batched(self, timeout: float | None = None) -> bool:
        """Wait for a background compile of the batched graph started by `batched_ready` -> whether it is ready."""
        if self._batch_compile is not None:
            self._batch_compile.join(timeout)
        return True in self.compile_seconds

    def __call__(self, rows: list[Row]) -> torch.Tensor | None:
        """Compute each row's one token and store its latents -> fp32 logits [rows with `last`, vocab], or None (the
        caller runs the eager model) for a batch while its graph is not ready."""
        if len(rows) > 1 and not self.batched_ready():
            return None
        return self.pool.store_decoded(rows, *self._run(rows))
