"""Load only the tensors a (partial) model has: what an expert-parallel rank or an offloaded model needs.

`kimi_k2.checkpoint.load_into` wants the model and the checkpoint to match name for name; a rank that holds a slice
of the experts (or a model whose experts stay on disk) has fewer tensors than the checkpoint, by design. This reads
exactly the model's own parameters and buffers through `CheckpointReader`, so nothing else is ever read.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_k2.checkpoint import CheckpointError, CheckpointReader
from kimi_k2.checkpoint.reader import loaded_dtype


def load_present(
    model: nn.Module, reader: CheckpointReader, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> list[str]:
    """Materialize every parameter and persistent buffer of `model` (meta is fine) -> the tensor names read."""
    targets = model.state_dict(keep_vars=True)
    missing = [n for n in targets if n not in reader]
    if missing:
        raise CheckpointError(f"checkpoint {reader.directory} lacks {len(missing)} tensors of the model: {missing}")
    source: dict[int, str] = {}  # tied tensors are one object under several names: read once
    for name, t in targets.items():
        if tuple(t.shape) != reader.shape(name):
            raise CheckpointError(f"shape mismatch for {name}: checkpoint {reader.shape(name)}, model {tuple(t.shape)}")
        source.setdefault(id(t), name)
    outs = {
        name: torch.empty(reader.shape(name), dtype=loaded_dtype(name, reader.stored_dtype(name), dtype), device=device)
        for name in source.values()
    }
    reader.read_into(outs)
    new = {i: outs[name] for i, name in source.items()}
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for attr, old in list(slots.items()):
                if old is not None and id(old) in new:
                    t = new[id(old)]
                    slots[attr] = nn.Parameter(t, requires_grad=False) if isinstance(old, nn.Parameter) else t
    return list(outs)
