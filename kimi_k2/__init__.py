"""kimi-k2: the Kimi K2 model family in PyTorch (model, checkpoints, tokenizer, engine, server, training)."""

from kimi_k2.config import K2Config

__version__ = "0.1.0"
__all__ = ["K2Config", "__version__"]
