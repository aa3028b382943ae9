"""Inference engine: paged MLA latent cache, continuous batching, prefix caching, sampling."""

from kimi_k2.engine.async_engine import AsyncLLMEngine
from kimi_k2.engine.engine_config import EngineConfig
from kimi_k2.engine.llm_engine import LLMEngine, PromptTooLongError
from kimi_k2.engine.params import CompletionDelta, SamplingParams, TokenConstraint, TokenLogprob

__all__ = [
    "AsyncLLMEngine",
    "CompletionDelta",
    "EngineConfig",
    "LLMEngine",
    "PromptTooLongError",
    "SamplingParams",
    "TokenConstraint",
    "TokenLogprob",
]
