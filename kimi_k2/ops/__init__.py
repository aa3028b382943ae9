"""Weight formats, layouts and kernels below the model: nothing here knows the K2 architecture.

layout.py:    zero-copy inference layouts (packed rows of grouped weights, fused transposed projections) as views.
kernels.py:   CPU linears on fp32 / fp16 / int8 (Q8_0) weights, by expert id too: torch ops on C++ kernels
              (kernels.cpp, built on first use) with a PyTorch reference as the fallback.
quantize.py:  int8 (Q8_0 blocks) and fp16 weights, `linear` for any format, and the swap that installs them.
triton/:      GPU kernels (paged MLA decode, block-FP8 GEMM) with their PyTorch references; imported lazily.
"""
