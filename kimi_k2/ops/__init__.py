"""Compute kernels the model calls: linear layers, attention and their GPU kernels (`kimi_k2.ops.triton`)."""
