"""Weight formats and layouts for inference, below the model: no module here knows the K2 architecture.

layout.py:    zero-copy stacking of same-shaped weights (the routed experts) into one [n, ...] tensor.
quantize.py:  int8 (per-channel) and fp16 linears on PyTorch's FBGEMM CPU kernels, and the swap that installs them.
"""
