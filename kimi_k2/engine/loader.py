"""The model behind an engine: a Kimi-format directory, or a preset with random weights (vLLM's `load_format="dummy"`)
for benchmarks and smoke runs without a checkpoint (`kimi-k2 generate k2-small`, `kimi-k2 bench`)."""

from __future__ import annotations

from pathlib import Path

import torch

from kimi_k2.config import PRESETS, K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.quantized import load_quantized, quantize_model


def load_model(name_or_dir: str, dtype: torch.dtype, seed: int = 0, quantization: str | None = None,
               device: torch.device | str = "cpu") -> K2ForCausalLM:
    """A model directory (read straight onto `device`), or a preset name with random weights (std 1/sqrt(fan_in), so
    logits are not flat; drawn on the CPU and moved, so every device gets the same weights for a seed).

    quantization "int8" / "fp16": the projections hold that format (`kimi_k2.model.quantized`), the rest fp32;
    a directory is then read one tensor at a time, never expanded whole. CPU formats: an error on another device.
    """
    if quantization is not None and torch.device(device).type != "cpu":
        raise ValueError(f"quantization {quantization!r} is a CPU format; on {device} load the checkpoint as it is "
                         "(block-FP8 weights stay FP8 on CUDA) or pass --device cpu")
    if Path(name_or_dir).is_dir() or name_or_dir not in PRESETS:
        if quantization is not None:
            return load_quantized(name_or_dir, quantization)
        return K2ForCausalLM.from_pretrained(name_or_dir, dtype=dtype, device=device)
    torch.manual_seed(seed)
    model = K2ForCausalLM.from_config(K2Config.from_preset(name_or_dir), torch.float32 if quantization else dtype)
    with torch.no_grad():
        for t in model.parameters():
            if t.ndim == 2:
                t.normal_(0.0, t.shape[1] ** -0.5)
    return quantize_model(model, quantization) if quantization else model.to(device).eval()
