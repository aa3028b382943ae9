"""Materialize a model (built on the meta device) from a safetensors checkpoint: all of it, or only what it holds.

The one loader behind `K2ForCausalLM.from_pretrained`, an expert-parallel rank (its slice of the routed experts,
`kimi_k2.parallel`), a head-parallel attention (its rows/columns of the head-major matrices) and a model whose routed
experts stay memory-mapped on disk (`kimi_k2.deploy.offload`). Names and shapes are checked against the safetensors
headers before any data is read; then only the tensors (and parts) the model holds are read, shard by shard.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from kimi_k2.checkpoint.reader import CheckpointError, CheckpointReader, Slice, loaded_dtype, name_list


def load_into(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | CheckpointReader,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    parts: Mapping[str, Slice] | None = None,
) -> list[str]:
    """Materialize every parameter and persistent buffer of `model` (meta-device is fine) -> the tensor names read.

    Block-FP8 and compressed-tensors INT4 weights (Kimi-K2-Thinking's routed experts) are dequantized at load, in
    fp32 and then cast (INT4 q * scale is exact in fp32; bf16 rounds it); `dtype=None` keeps each tensor's stored dtype
    (fp8 -> bf16, INT4 -> its scales' dtype, bf16 in K2-Thinking). Tensors the
    checkpoint lacks are always an error. Tensors the model does not have are an error with `strict`; without it they
    are left unread (an expert-parallel rank, a model whose experts stay on disk: part of the checkpoint by design).
    parts: name -> Slice(dim, start, stop): the model holds only that part of the tensor (tensor parallelism).
    A tensor already materialized with the right dtype, device and shape is filled in place (the Parameter objects
    that optimizers and hooks hold stay valid); anything else (meta, other dtype/device) gets a new tensor.
    """
    reader = checkpoint if isinstance(checkpoint, CheckpointReader) else CheckpointReader(checkpoint)
    parts = dict(parts or {})
    targets = model.state_dict(keep_vars=True)
    # tied tensors (lm_head.weight = embed_tokens.weight) are one object under several names: read it once, under
    # the first of its names the checkpoint has
    source: dict[int, str] = {}
    for name, t in targets.items():
        if name in reader:
            source.setdefault(id(t), name)
    missing = [n for n, t in targets.items() if id(t) not in source]
    if missing:
        raise CheckpointError(
            f"checkpoint {reader.directory} lacks {len(missing)} tensors of the model: {name_list(missing)}")
    unexpected = [n for n in reader if n not in targets]
    if unexpected and strict:
        raise CheckpointError(f"checkpoint {reader.directory} has {len(unexpected)} tensors the model does not: "
                              f"{name_list(unexpected)}")
    if unknown := [n for n in parts if n not in targets]:
        raise CheckpointError(f"slices given for tensors the model does not have: {name_list(unknown)}")
    for name, t in targets.items():
        want = reader.part_shape(name, parts[name]) if name in parts else reader.shape(name)
        if tuple(t.shape) != want:
            raise CheckpointError(f"shape mismatch for {name}: checkpoint {reader.shape(name)}"
                                  f"{f' sliced to {want}' if name in parts else ''}, model {tuple(t.shape)}")
    dev = torch.empty(0, device=device).device  # "cuda" -> cuda:0, as tensors report it
    outs, new = {}, {}
    for name in source.values():
        t = targets[name]
        want = loaded_dtype(name, reader.stored_dtype(name), dtype)
        if not t.is_meta and t.dtype == want and t.device == dev:
            outs[name] = t.detach()
        else:
            out = outs[name] = torch.empty(t.shape, dtype=want, device=dev)
            new[id(t)] = nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out
    reader.read_into(outs, parts)
    for module in model.modules():
        held = [*module.named_parameters(recurse=False, remove_duplicate=False),
                *module.named_buffers(recurse=False, remove_duplicate=False)]
        for attr, old in held:
            if id(old) in new:
                setattr(module, attr, new[id(old)])
    return list(source.values())
