"""`fp8_linear`: y = x @ W^T for block-FP8 weights (K2 layout), on the best path the device has.

Paths (`fp8_path` picks; none dequantizes the whole weight into memory except "reference"):
    "scaled_mm"     Hopper (sm90) with CUDA >= 12.9, N and K multiples of 128: cuBLAS block-scaled FP8 GEMM through
                    `torch.nn.functional.scaled_mm` (1x128 activation scales x 128x128 weight scales).
    "triton_fp8"    other CUDA GPUs with FP8 tensor cores (sm89+): the Triton kernel, e4m3 x e4m3.
    "triton_w8a16"  CUDA GPUs without FP8 (sm < 89): the Triton kernel decodes the e4m3 weights to the activation dtype
                    (bf16/fp16) in registers: FP8 memory, bf16 math.
    "reference"     CPU and anything else (or CUDA without triton): dequantize, matmul in fp32.
FP8 paths quantize x per 1x128 group (DeepSeek-V3); the others use x as it is. Importing this module does not
import triton.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .reference import GROUP, check_fp8_linear_args, fp8_linear_reference

PATHS = ("scaled_mm", "triton_fp8", "triton_w8a16", "reference")


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _cuda_caps(index: int) -> tuple[tuple[int, int], tuple[int, ...]]:
    cuda = tuple(int(v) for v in (torch.version.cuda or "0.0").split(".")[:2])
    return torch.cuda.get_device_capability(index), cuda


def scaled_mm_supported(device: torch.device, n: int, k: int) -> bool:
    """Block-wise (1x128 x 128x128) scaling in cuBLAS: sm90 with CUDA 12.9+ (PyTorch's own scaled_mm tests gate it so),
    on whole 128-blocks."""
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or n % GROUP or k % GROUP:
        return False
    cap, cuda = _cuda_caps(device.index if device.index is not None else torch.cuda.current_device())
    return cap == (9, 0) and cuda >= (12, 9) and torch.version.hip is None


def fp8_path(device: torch.device, n: int, k: int) -> str:
    """Which of PATHS `fp8_linear` takes for a weight [n, k] on `device`."""
    if scaled_mm_supported(device, n, k):
        return "scaled_mm"
    if device.type != "cuda" or not _triton_available():
        return "reference"
    cap, _ = _cuda_caps(device.index if device.index is not None else torch.cuda.current_device())
    return "triton_fp8" if cap >= (8, 9) else "triton_w8a16"


def scaled_mm_block_fp8(
    x_q: torch.Tensor, x_s: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """x_q [M, K] e4m3 with 1x128 scales x_s [M, K/128] (stride (1, M), as `quantize_act` returns them) times the
    block-FP8 weight -> [M, N] bf16, through `torch.nn.functional.scaled_mm`."""
    # weight scales as cuBLAS reads them: [L4, N/128] with stride (1, L4), L4 = K/128 rounded up to a multiple of 4
    pad = -scale.shape[1] % 4
    w_s = (F.pad(scale, (0, pad)) if pad else scale).t()
    return F.scaled_mm(x_q, weight.t(), x_s, F.ScalingType.BlockWise1x128, w_s, F.ScalingType.BlockWise128x128,
                       swizzle_a=F.SwizzleType.NO_SWIZZLE, swizzle_b=F.SwizzleType.NO_SWIZZLE,
                       output_dtype=torch.bfloat16)


def fp8_linear_scaled_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The "scaled_mm" path: x [..., K] -> [..., N] as x.dtype (activations quantized by the Triton kernel)."""
    from .fp8_gemm import quantize_act

    check_fp8_linear_args(x, weight, scale)
    N, K = weight.shape
    y = scaled_mm_block_fp8(*quantize_act(x.reshape(-1, K)), weight, scale)
    return y.to(x.dtype).view(*x.shape[:-1], N)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (weight * scale)^T as x.dtype; weight [N, K] e4m3, scale [ceil(N/128), ceil(K/128)]
    fp32 (`weight_scale_inv`). path: one of PATHS (default: `fp8_path`'s pick for the device; the Triton paths run
    on CPU tensors under TRITON_INTERPRET=1)."""
    check_fp8_linear_args(x, weight, scale)
    if path is None:
        path = fp8_path(x.device, *weight.shape)
    elif path not in PATHS:
        raise ValueError(f"fp8_linear: path must be one of {PATHS}, got {path!r}")
    if path == "scaled_mm":
        return fp8_linear_scaled_mm(x, weight, scale)
    if path == "reference":
        return fp8_linear_reference(x, weight, scale, quantize_activations=False)
    from .fp8_gemm import fp8_gemm

    return fp8_gemm(x, weight, scale, fp8_dot=path == "triton_fp8")
