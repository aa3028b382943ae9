"""The model behind an engine: a Kimi-format directory, or a preset with random weights (vLLM's `load_format="dummy"`)
for benchmarks and smoke runs without a checkpoint (`kimi-k2 generate k2-small`, `kimi-k2 bench`).

On CUDA a block-FP8 checkpoint stays FP8 in GPU memory (`load_fp8_resident`: its projections become
`kimi_k2.ops.triton.fp8_module.FP8Linear`); on the CPU it is dequantized at load (the faster CPU path)."""

from __future__ import annotations

import ctypes
import functools
import platform
from pathlib import Path

import torch

from kimi_k2.checkpoint import CheckpointReader, load_into
from kimi_k2.config import PRESETS, K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.quantized import load_quantized, quantize_model
from kimi_k2.ops.triton.fp8_module import fp8_candidates, load_fp8_weights, to_fp8_resident

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value


@functools.cache
def return_freed_tensors() -> bool:
    """Keep glibc's mmap threshold at its initial 128 KiB -> whether it was set (glibc only).

    glibc raises the threshold to the size of every mmapped block freed (up to 32 MiB), so once loading, quantizing
    or laying out weights has freed a few tensors, later ones up to 32 MiB come from the heap, and the holes they leave
    when they are replaced are never given back: the process keeps the replaced copies as RSS (k2-medium: +600 MiB after
    `prepare_decode_layout`). A threshold set with mallopt stays fixed, so each tensor of 128 KiB or more is its own
    mapping, unmapped when freed.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def load_model(name_or_dir: str, dtype: torch.dtype, seed: int = 0, quantization: str | None = None,
               device: torch.device | str = "cpu", fp8_resident: bool | None = None) -> K2ForCausalLM:
    """A model directory (read straight onto `device`), or a preset name with random weights (std 1/sqrt(fan_in), so
    logits are not flat; drawn on the CPU and moved, so every device gets the same weights for a seed).

    quantization "int8" / "fp16": the projections hold that format (`kimi_k2.model.quantized`), the rest fp32;
    a directory is then read one tensor at a time, never expanded whole. CPU formats: an error on another device.
    fp8_resident: keep a block-FP8 directory's projections FP8 (`load_fp8_resident`); default: on CUDA.
    """
    if quantization is not None and torch.device(device).type != "cpu":
        raise ValueError(f"quantization {quantization!r} is a CPU format; on {device} load the checkpoint as it is "
                         "(block-FP8 weights stay FP8 on CUDA) or pass --device cpu")
    return_freed_tensors()
    if Path(name_or_dir).is_dir() or name_or_dir not in PRESETS:
        if quantization is not None:
            return load_quantized(name_or_dir, quantization)
        if fp8_resident or (fp8_resident is None and torch.device(device).type == "cuda"):
            reader = CheckpointReader(name_or_dir)
            if any(reader.is_fp8(n) for n in reader):
                return load_fp8_resident(reader, dtype, device)
        return K2ForCausalLM.from_pretrained(name_or_dir, dtype=dtype, device=device)
    torch.manual_seed(seed)
    model = K2ForCausalLM.from_config(K2Config.from_preset(name_or_dir), torch.float32 if quantization else dtype)
    with torch.no_grad():
        for t in model.parameters():
            if t.ndim == 2:
                t.normal_(0.0, t.shape[1] ** -0.5)
    return quantize_model(model, quantization) if quantization else model.to(device).eval()


def load_fp8_resident(checkpoint: str | CheckpointReader, dtype: torch.dtype, device: torch.device | str,
                      path: str | None = None) -> K2ForCausalLM:
    """A block-FP8 checkpoint with its FP8 projections kept as stored (e4m3 + 128x128 scales, `FP8Linear`) and the
    rest (embeddings, norms, router, kv_b_proj, lm_head) in `dtype`, all on `device`: weight memory is the
    checkpoint's size. path: force one of `kimi_k2.ops.triton.PATHS` (default: the device's best)."""
    reader = checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)
    if reader.block != (128, 128):
        raise ValueError(f"FP8-resident weights need 128x128 scale blocks, {reader.directory} has {reader.block}")
    with torch.device("meta"):
        model = K2ForCausalLM(K2Config.from_pretrained(reader.directory))
    to_fp8_resident(model, [n for n in fp8_candidates(model) if reader.is_fp8(f"{n}.weight")], path)
    load_into(model, reader, dtype, device, strict=False)  # everything but the FP8 projections
    load_fp8_weights(model, reader, device)
    return model.eval()
