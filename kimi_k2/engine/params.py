"""What a request asks of the engine (SamplingParams) and what the engine streams back (CompletionDelta)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

FinishReason = Literal["stop", "length", "abort"]


class TokenConstraint(Protocol):
    """Constrained decoding hook (grammar / JSON schema), one instance per sample."""

    def allowed(self) -> torch.Tensor | None:
        """Bool mask [vocab_size] of the tokens allowed next, or None when anything is allowed."""
        ...

    def advance(self, token_id: int) -> None:
        """The engine sampled `token_id`."""
        ...

    def is_finished(self) -> bool:
        """True once the grammar is complete: the engine then ends the sample with finish_reason "stop"."""
        ...


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # same seed, same prompt -> same tokens
    n: int = 1
    stop: list[str] = field(default_factory=list)  # stop strings; never part of the returned text
    stop_token_ids: list[int] = field(default_factory=list)  # added to the model's EOS ids
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob plus the top k
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-inf: banned)
    constraint: Callable[[], TokenConstraint] | None = None  # factory, called once per sample


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), best first


@dataclass
class CompletionDelta:
    """New output of one sample of one request since the previous delta."""

    request_id: str
    index: int  # which of the n samples
    token_ids: list[int]
    text: str  # incrementally detokenized: never a broken UTF-8 sequence, never (part of) a stop string
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int  # cumulative for this sample
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the request failed (finish_reason "abort"): why, e.g. its constraint broke
