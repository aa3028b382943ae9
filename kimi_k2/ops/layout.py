"""Inference layouts of weights without a second copy: one tensor owns the memory and every module's weight becomes a
view of its part, so the modules, state_dict and in-place updates all see the same bytes.

pack_rows:     the weights of groups of modules as one [groups, rows, ...] tensor: each group's weights concatenated
               along their rows (gate | up of an expert: one product for both), groups stacked (the routed experts,
               read by expert id). Works on Parameters and buffers alike (float, fp16, int8 weights and their scales).
fuse_columns:  fp32 linears reading the same input (q_a | kv_a, gate | up) as one transposed [in, sum(out)] matrix:
               one BLAS product for all, and W^T contiguous streams the weight ~2x faster than a row-major W when x
               has few rows (decode) on CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def packed_view(groups: list[list[nn.Module]], name: str) -> torch.Tensor | None:
    """The [G, R, ...] tensor `pack_rows(groups, name)` made, if every module's `name` is still its view, else None."""
    first = getattr(groups[0][0], name)
    trailing, inner = tuple(first.shape[1:]), math.prod(first.shape[1:])
    rows = sum(getattr(m, name).shape[0] for m in groups[0])
    ptr, start = first.untyped_storage().data_ptr(), first.storage_offset()
    for g, modules in enumerate(groups):
        offset = start + g * rows * inner
        for m in modules:
            t = getattr(m, name)
            if (t.dtype != first.dtype or tuple(t.shape[1:]) != trailing or not t.is_contiguous()
                    or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset):
                return None
            offset += t.shape[0] * inner
        if offset != start + (g + 1) * rows * inner:
            return None
    shape = (len(groups), rows, *trailing)
    return first.as_strided(shape, torch.empty(shape, device="meta").stride(), start)


def pack_rows(groups: list[list[nn.Module]], name: str) -> torch.Tensor:
    """Pack `name` (a Parameter or buffer [N_i, ...]) of each module: [G, sum_i N_i, ...], group g's modules' rows
    one after another; each module's tensor becomes a view of its rows. Already packed: returned as is.

    Memory: the pack is allocated, then each original is copied in and released: the peak is the pack plus what the
    originals held.
    """
    view = packed_view(groups, name)
    if view is not None:
        return view
    first = getattr(groups[0][0], name)
    rows = {sum(getattr(m, name).shape[0] for m in modules) for modules in groups}
    if len(rows) != 1:
        raise ValueError(f"pack_rows needs groups of equal rows, got {sorted(rows)}")
    rows = rows.pop()
    pack = torch.empty((len(groups), rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
    for g, modules in enumerate(groups):
        offset = 0
        for m in modules:
            t = getattr(m, name)
            part = pack[g, offset : offset + t.shape[0]]
            part.copy_(t.detach())
            setattr(m, name, nn.Parameter(part, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
                    else part)
            offset += t.shape[0]
    return pack


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
