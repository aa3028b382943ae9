"""A K2 model whose projections hold int8 or fp16 weights (`kimi_k2.ops.quantize`), made from a float model or read
from a checkpoint one tensor at a time, so a block-FP8 or bf16 checkpoint is never expanded whole to fp32.

Quantized: every nn.Linear (attention and MLP projections, routed and shared experts, lm_head) except kv_b_proj,
whose W_UK / W_UV the latent attention absorbs as dense fp32 matrices. Kept in fp32: embeddings, norms, the router
(fp32 in DeepSeek-V3 too) and kv_b_proj. With int8 the attention projections are fp16: int8's ~1% error per product
in q / k moves which keys win the softmax, and over 8 layers of a random-weight 100M model that decorrelated the
logits entirely (greedy agreement 0 with int8 attention, 1.0 with fp16 attention); they are a small share of the
weights of an MoE model.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable

import torch

from ..checkpoint import CheckpointReader, load_into
from ..config import K2Config
from ..ops.quantize import FORMATS, quantize_linears
from .transformer import K2ForCausalLM

_KEPT = re.compile(r"(^|\.)kv_b_proj$")


def kept_in_float(name: str) -> bool:
    return _KEPT.search(name) is not None


def _formats(fmt: str) -> list[tuple[str, Callable[[str], bool]]]:
    """(format, which linears to keep out of it) in the order to apply them."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}; choose one of {FORMATS}")
    if fmt == "int8":
        return [("fp16", lambda n: ".self_attn." not in n or kept_in_float(n)), ("int8", kept_in_float)]
    return [(fmt, kept_in_float)]


def quantize_model(model: K2ForCausalLM, fmt: str) -> K2ForCausalLM:
    """Swap the model's projections for `fmt` linears in place (the float weights are freed as they go)."""
    with torch.no_grad():
        for f, keep in _formats(fmt):
            quantize_linears(model, f, keep=keep)
    return model.float().eval()


def load_quantized(path: str | os.PathLike[str], fmt: str) -> K2ForCausalLM:
    """K2ForCausalLM from a checkpoint directory with `fmt` projections; the other tensors are loaded as fp32.

    Each projection is read (block-FP8 dequantized) as fp32, quantized and dropped before the next is read: the peak
    is the quantized model plus one fp32 weight.
    """
    formats = _formats(fmt)
    config = K2Config.from_pretrained(path)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    reader = CheckpointReader(path)

    def source(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = reader.get(name + ".bias", torch.float32) if name + ".bias" in reader else None
        return reader.get(name + ".weight", torch.float32), bias

    with torch.no_grad():
        done = [n for f, keep in formats for n in quantize_linears(model, f, keep=keep, source=source)]
    with warnings.catch_warnings():  # the quantized projections' tensors are in the checkpoint, not in the model
        warnings.filterwarnings("ignore", message=r"checkpoint .* has \d+ tensors the model does not")
        load_into(model, path, dtype=torch.float32, strict=False)
    quantized = {f"{n}.{p}" for n in done for p in ("weight", "bias")}
    missing = [n for n in reader if n not in quantized and n not in model.state_dict()]
    if missing:
        raise ValueError(f"checkpoint {path} has tensors the model does not: {missing[:5]}")
    return model.eval()
