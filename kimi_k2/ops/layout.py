"""Inference layouts of weights without a second copy: one tensor owns the memory and every module's Parameter
becomes a view of its part, so the modules, state_dict and in-place updates all see the same bytes.

stack_parameters: same-shaped weights (the routed experts) as one [n, ...] stack, indexed by expert id.
fuse_columns:     linears reading the same input (q_a | kv_a, gate | up) as one transposed [in, sum(out)] matrix: one
                  BLAS product for all, and W^T contiguous streams the weight ~2x faster than a row-major W when x has
                  few rows (decode) on CPU.
"""

from __future__ import annotations

import torch
from torch import nn


def stacked_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """[n, *shape] view over `tensors` if they are equally spaced, contiguous slices of one storage, else None."""
    first = tensors[0]
    if not first.is_contiguous() or any(t.shape != first.shape or t.dtype != first.dtype or not t.is_contiguous()
                                        or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                                        for t in tensors):
        return None
    step = first.numel()
    if any(t.storage_offset() != first.storage_offset() + i * step for i, t in enumerate(tensors)):
        return None
    return first.as_strided((len(tensors), *first.shape), (step, *first.stride()), first.storage_offset())


def stack_parameters(owners: list[nn.Module], name: str) -> torch.Tensor:
    """Stack `owner.<name>` of every owner into one [n, ...] tensor and make each a view of its row -> the stack.

    Already stacked (views of one tensor, in order): returned as is. Memory: the stack is allocated, then each
    original is copied in and released, so the peak is one stack plus what the originals held.
    """
    params = [getattr(m, name) for m in owners]
    view = stacked_view([p.detach() for p in params])
    if view is not None:
        return view
    stack = torch.empty((len(params), *params[0].shape), dtype=params[0].dtype, device=params[0].device)
    for i, (m, p) in enumerate(zip(owners, params, strict=True)):
        stack[i].copy_(p.detach())
        setattr(m, name, nn.Parameter(stack[i], requires_grad=p.requires_grad) if isinstance(p, nn.Parameter)
                else stack[i])
    return stack


def fuse_columns(linears: list[nn.Linear]) -> torch.Tensor:
    """Store the weights of linears that read the same input side by side, transposed: one [in, sum(out)] contiguous
    tensor W^T whose column blocks are each linear's W^T (each weight stays a [out, in] view of its block), so one
    BLAS product computes all of them -> that tensor. Already fused: returned as is."""
    fused = fused_view([m.weight.detach() for m in linears])
    if fused is not None:
        return fused
    weights = [m.weight.detach() for m in linears]
    buf = torch.empty(weights[0].shape[1], sum(w.shape[0] for w in weights), dtype=weights[0].dtype,
                      device=weights[0].device)
    start = 0
    for m, w in zip(linears, weights, strict=True):
        block = buf[:, start : start + w.shape[0]]
        block.copy_(w.t())
        m.weight = nn.Parameter(block.t(), requires_grad=m.weight.requires_grad)
        start += w.shape[0]
    return buf


def fused_view(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The [in, sum(out)] tensor W^T that `fuse_columns` made of these [out, in] weights, or None."""
    first = weights[0]
    width = sum(w.shape[0] for w in weights)
    start = first.storage_offset()
    for w in weights:
        if (w.dtype != first.dtype or w.shape[1] != first.shape[1] or w.stride() != (1, width)
                or w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or w.storage_offset() != start):
            return None
        start += w.shape[0]
    return first.as_strided((first.shape[1], width), (width, 1), first.storage_offset())
