"""Kimi K2 tokenizer (tiktoken BPE + 256 special slots), chat template, BPE trainer, streaming detokenizer."""

from kimi_k2.tokenizer.detok import IncrementalDetokenizer
from kimi_k2.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
