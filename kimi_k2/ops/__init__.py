"""Weight formats, layouts and kernels below the model: nothing here knows the K2 architecture.

layout.py:    zero-copy inference layouts (stacked same-shaped weights, fused transposed projections) as views.
quantize.py:  int8 (per-channel weights, per-row activations) and fp16 linears on PyTorch's FBGEMM CPU kernels, and
              the swap that installs them.
triton/:      GPU kernels (paged MLA decode, block-FP8 GEMM) with their PyTorch references; imported lazily.
"""
