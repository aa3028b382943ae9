"""Sequence: one sample of one request (a request with n > 1 owns n sequences) and its place in the page pool."""

from __future__ import annotations

import random
from enum import Enum, auto

import torch

from kimi_k2.engine.params import SamplingParams, TokenConstraint


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams,
                 first: Sequence | None = None, device: torch.device | str = "cpu"):
        self.request_id = request_id
        self.index = index
        self.first = first  # sample 0 of the same request, whose prompt pages samples 1..n-1 reuse
        self.params = params
        self.token_ids = list(prompt_ids)  # prompt + completion
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0  # tokens whose latents are in the cache
        self.num_cached_prompt_tokens = 0  # of those, served by the prefix cache at admission
        self.block_table: list[int] = []  # page ids, in token order
        self.num_hashed_pages = 0  # leading full pages already registered with the prefix cache
        self.page_hashes: list[int] = []  # chain hash of each registered page
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        seed = params.seed + index if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device).manual_seed(seed)  # on the device the logits are sampled on
        self.constraint: TokenConstraint | None = params.constraint() if params.constraint is not None else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def prompt_pending(self) -> bool:
        """Sample 0 of this request is computing the prompt right now."""
        f = self.first
        return f is not None and f.status is SequenceStatus.RUNNING and f.num_computed_tokens < f.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

