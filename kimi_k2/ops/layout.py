"""Same-shaped weights as one stacked tensor without a second copy: the stack owns the memory and every module's
Parameter becomes a view of its row, so the modules, state_dict and in-place updates all see the stacked bytes."""

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
