"""Load only the tensors a (partial) model has: what an expert-parallel rank or an offloaded model needs.

`kimi_k2.checkpoint.load_into` wants the model and the checkpoint to match name for name; a rank that holds a slice
of the experts (or a model whose experts stay on disk) has fewer tensors than the checkpoint, by design. This reads
exactly the model's own parameters and buffers through `CheckpointReader`, so nothing else is ever read; tensors
named in `slices` (tensor parallelism) are read whole and narrowed to the rank's part.
"""

from __future__ import annotations

import torch
from torch import nn

from kimi_k2.checkpoint import CheckpointError, CheckpointReader
from kimi_k2.checkpoint.reader import loaded_dtype


def load_present(
    model: nn.Module, reader: CheckpointReader, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
    slices: dict[str, tuple[int, int, int]] | None = None,
) -> list[str]:
    """Materialize every parameter and persistent buffer of `model` (meta is fine) -> the tensor names read.

    slices: name -> (dim, start, stop): the model holds checkpoint[name].narrow(dim, start, stop - start).
    """
    slices = slices or {}
    targets = model.state_dict(keep_vars=True)
    missing = [n for n in targets if n not in reader]
    if missing:
        raise CheckpointError(f"checkpoint {reader.directory} lacks {len(missing)} tensors of the model: {missing}")
    source: dict[int, str] = {}  # tied tensors are one object under several names: read once
    for name, t in targets.items():
        want = list(reader.shape(name))
        if name in slices:
            dim, start, stop = slices[name]
            if not 0 <= start < stop <= want[dim]:
                raise CheckpointError(f"slice {start}:{stop} of dim {dim} is outside {name} {tuple(want)}")
            want[dim] = stop - start
        if tuple(t.shape) != tuple(want):
            raise CheckpointError(f"shape mismatch for {name}: checkpoint {reader.shape(name)}"
                                  f"{' sliced to ' + str(tuple(want)) if name in slices else ''}, "
                                  f"model {tuple(t.shape)}")
        source.setdefault(id(t), name)
    outs = {
        name: torch.empty(reader.shape(name), dtype=loaded_dtype(name, reader.stored_dtype(name), dtype), device=device)
        for name in source.values() if name not in slices
    }
    reader.read_into(outs)
    for name in source.values():
        if name in slices:
            dim, start, stop = slices[name]
            outs[name] = reader.get(name, dtype).narrow(dim, start, stop - start).contiguous().to(device)
    new = {i: outs[name] for i, name in source.items()}
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for attr, old in list(slots.items()):
                if old is not None and id(old) in new:
                    t = new[id(old)]
                    slots[attr] = nn.Parameter(t, requires_grad=False) if isinstance(old, nn.Parameter) else t
    return list(source.values())
