"""What the Triton kernel modules share: the interpreter check, the device check and a dot that the interpreter
computes correctly. Imports triton: only the kernel modules import this file."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreted(kernel: object) -> bool:
    """True when `kernel` was built by the CPU interpreter (TRITON_INTERPRET=1 when its module was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(kernel: object, name: str, *tensors: torch.Tensor) -> None:
    """Compiled kernels need CUDA tensors; the interpreter runs on the CPU."""
    if interpreted(kernel) or all(t.is_cuda for t in tensors):
        return
    raise ValueError(f"{name}: the Triton kernel needs CUDA tensors, got {sorted({str(t.device) for t in tensors})}; "
                     "on the CPU set TRITON_INTERPRET=1 before importing kimi_k2.ops.triton kernels, or use the "
                     "PyTorch reference")


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: multiply as fp32 (exact for bf16/fp16 operands): Triton 3.9's interpreter
    multiplies bf16 operands as their raw uint16 bits. IEEE: fp32 operands without TF32 rounding."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        out = tl.dot(a, b, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


def dot_flags(kernel: object, dtype: torch.dtype) -> dict[str, bool]:
    """The UPCAST / IEEE constants of `dot` for operands of `dtype`."""
    return {"UPCAST": interpreted(kernel) and dtype == torch.bfloat16, "IEEE": dtype == torch.float32}
