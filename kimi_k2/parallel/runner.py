"""Lockstep execution for model-parallel inference: rank 0 drives, every other rank mirrors each step.

With expert (or tensor) parallelism every forward is a collective, so all ranks must run the same step with the same
inputs. The driver calls `DistributedRunner.step(payload)`: the payload (any picklable step description: token ids,
positions, block tables) is broadcast, then every rank runs `step_fn(payload)`. Workers sit in `serve()` until the
driver calls `shutdown()`. `CachedStepper` is a step_fn over a contiguous latent cache (greedy generation, also
usable in one process); the serving engine's is `ModelRunner.forward` over its paged latent pool
(`kimi_k2.deploy.serve_ep`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.dense_cache import DenseLatentCache


class DistributedRunner:
    def __init__(self, step_fn: Callable[[Any], Any], src: int = 0, group: dist.ProcessGroup | None = None) -> None:
        self.step_fn, self.src, self.group = step_fn, src, group

    def _broadcast(self, payload: Any) -> Any:
        box = [payload]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def step(self, payload: Any) -> Any:
        """Driver: send `payload` to every rank and run it here too."""
        if payload is None:
            raise ValueError("a step payload of None is reserved for shutdown()")
        return self.step_fn(self._broadcast(payload))

    def serve(self) -> None:
        """Worker: run the driver's steps until it shuts down."""
        while (payload := self._broadcast(None)) is not None:
            self.step_fn(payload)

    def shutdown(self) -> None:
        self._broadcast(None)


class CachedStepper:
    """step_fn: {"input_ids": [[int]] (B rows, equal length), "reset": bool} -> last-position logits [B, vocab] fp32.

    `reset` starts new sequences (a fresh cache of `max_len` slots); later steps extend them.
    """

    def __init__(self, model: K2ForCausalLM, max_len: int) -> None:
        self.model, self.max_len = model, max_len
        self.dtype = next(model.parameters()).dtype
        self.cache: DenseLatentCache | None = None

    @torch.inference_mode()
    def __call__(self, payload: dict[str, Any]) -> torch.Tensor:
        ids = torch.tensor(payload["input_ids"], dtype=torch.long)  # [B, S]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be B rows of equal length, got shape {tuple(ids.shape)}")
        if payload.get("reset") or self.cache is None:
            self.cache = DenseLatentCache.for_model(self.model.config, ids.shape[0], self.max_len, self.dtype)
        self.cache.begin([ids.shape[1]] * ids.shape[0])
        logits = self.model(ids, self.cache.positions(ids.shape[1]), self.cache)  # [B, S, vocab]
        self.cache.end()
        return logits[:, -1]


def greedy_generate(
    step: Callable[[dict[str, Any]], torch.Tensor], prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy decoding of equal-length prompts -> (new token ids [B][n], their logits [B, n, vocab])."""
    if not prompts or len({len(p) for p in prompts}) != 1 or not prompts[0]:
        raise ValueError(f"prompts must be non-empty and of equal length, got lengths {[len(p) for p in prompts]}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    logits = step({"input_ids": prompts, "reset": True})
    out = [logits]
    for _ in range(max_new_tokens - 1):
        logits = step({"input_ids": logits.argmax(-1)[:, None].tolist()})
        out.append(logits)
    all_logits = torch.stack(out, dim=1)  # [B, n, vocab]
    return all_logits.argmax(-1).tolist(), all_logits
