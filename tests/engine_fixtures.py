"""Checks shared by the tests of the decode backends (compiled, AOTInductor): a fast engine against the eager one."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from kimi_k2.engine import LLMEngine, SamplingParams
from kimi_k2.model import K2ForCausalLM

PROMPT_LENGTHS = (1, 15, 16, 17, 37)  # page boundaries (page 16) and a 1-token prompt


def assert_batch_same(model: K2ForCausalLM, fast: LLMEngine, eager: LLMEngine,
                      around: Callable[[], AbstractContextManager] = contextlib.nullcontext) -> None:
    """A batch of prompts of different lengths with different max_tokens, so the decode batch shrinks from 5 sequences
    to 1 as they finish: each gets its single-stream eager tokens, and no decode step of `fast` runs the eager model
    (a spy on the model's forward sees only prefill chunks). `around` wraps the batched generate."""
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True) for i in range(len(prompts))]
    single = [eager.generate([p], q)[0][0].token_ids for p, q in zip(prompts, params, strict=True)]
    eager_steps: list[int] = []
    model_forward = fast.runner.model.model.forward

    def spy(input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        eager_steps.append(input_ids.shape[1])
        return model_forward(input_ids, *args, **kwargs)

    fast.runner.model.model.forward = spy
    try:
        with around():
            assert [r[0].token_ids for r in fast.generate(prompts, params)] == single
    finally:
        del fast.runner.model.model.forward
    assert eager_steps and all(s > 1 for s in eager_steps), f"a decode step ran the eager model: {eager_steps}"
