"""GPU kernels in Triton with their PyTorch references: paged MLA decode (`mla_decode`) and the block-FP8 GEMM with
1x128 activation quantization (`fp8_gemm`, `quantize_act`), plus `fp8_linear`, which picks cuBLAS, Triton or the
reference per device.

Importing this package (and `fp8_linear`, `reference`) does not import triton; the kernel modules `mla_decode`,
`fp8_gemm` and `common` do. Whether a kernel compiles for the GPU or runs on the CPU under Triton's interpreter is
fixed when its module is imported: set TRITON_INTERPRET=1 before that to run it on CPU tensors (tests, dry runs).
"""

from .fp8_linear import PATHS, fp8_linear, fp8_path
from .reference import fp8_linear_reference, mla_decode_reference, quantize_act_reference

__all__ = ["PATHS", "fp8_linear", "fp8_linear_reference", "fp8_path", "mla_decode_reference",
           "quantize_act_reference"]
