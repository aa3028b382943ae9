"""A K2 model whose projections hold int8 or fp16 weights (`kimi_k2.ops.quantize`), made from a float model or read
from a checkpoint one tensor at a time, so a block-FP8 or bf16 checkpoint is never expanded whole to fp32.

Quantized: every projection (attention, kv_b_proj included, dense and shared MLPs, routed experts, lm_head), as
llama.cpp's Q8_0 / F16 files do, and the embedding table (`QuantizedEmbedding`: a lookup dequantizes the rows it
reads, as llama.cpp reads token_embd). Kept in fp32: norms and the router (fp32 in DeepSeek-V3 too).
"""

from __future__ import annotations

import os
import warnings

import torch

from ..checkpoint import CheckpointReader, load_into
from ..config import K2Config
from ..ops.quantize import FORMATS, quantize_linears
from .layers import QuantizedEmbedding
from .transformer import K2ForCausalLM

EMBEDDING = "model.embed_tokens.weight"


def _check(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {FORMATS}")


def quantize_model(model: K2ForCausalLM, fmt: str) -> K2ForCausalLM:
    """Swap the model's projections for `fmt` linears in place (the float weights are freed as they go)."""
    _check(fmt)
    with torch.no_grad():
        quantize_linears(model, fmt)
        _quantize_embedding(model, model.model.embed_tokens.weight, fmt)
    return model.float().eval()


def _quantize_embedding(model: K2ForCausalLM, weight: torch.Tensor, fmt: str) -> bool:
    """Swap the embedding for a `fmt` QuantizedEmbedding of `weight` -> whether it was (its width allows `fmt`)."""
    embedding = QuantizedEmbedding.from_float(weight, fmt)
    if embedding is not None:
        model.model.embed_tokens = embedding
    return embedding is not None


def load_quantized(path: str | os.PathLike[str], fmt: str) -> K2ForCausalLM:
    """K2ForCausalLM from a checkpoint directory with `fmt` projections; the other tensors are loaded as fp32.

    Each projection (and the embedding) is read (block-FP8 dequantized) as fp32, quantized and dropped before the next
    is read: the peak is the quantized model plus one fp32 weight and its quantization's temporaries.
    """
    _check(fmt)
    config = K2Config.from_pretrained(path)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    reader = CheckpointReader(path)

    def source(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = reader.get(name + ".bias", torch.float32) if name + ".bias" in reader else None
        return reader.get(name + ".weight", torch.float32), bias

    with torch.no_grad():
        done = quantize_linears(model, fmt, source=source)
        embedding = _quantize_embedding(model, reader.get(EMBEDDING, torch.float32), fmt)
    with warnings.catch_warnings():  # the quantized projections' tensors are in the checkpoint, not in the model
        warnings.filterwarnings("ignore", message=r"checkpoint .* has \d+ tensors the model does not")
        load_into(model, path, dtype=torch.float32, strict=False)
    quantized = {f"{n}.{p}" for n in done for p in ("weight", "bias")} | ({EMBEDDING} if embedding else set())
    missing = [n for n in reader if n not in quantized and n not in model.state_dict()]
    if missing:
        raise ValueError(f"checkpoint {path} has tensors the model does not: {missing[:5]}")
    return model.eval()
