"""The weight dict a compiled decode step reads (`decode_weights`), kept current with the model without rebuilding it
every step; shared by the torch.compile (`compiled_decode`) and AOTInductor (`aot_decode`) decoders."""

from __future__ import annotations

import operator

import torch
from torch import nn

from kimi_k2.model.decode import DecodeWeights, decode_weights


class WatchedWeights:
    """`decode_weights(model)`, rebuilt whenever a tensor of the model is replaced (in-place updates write the tensors
    the graph already reads: the fused and packed weights are views). Walking the module tree every step cost ~1 ms, a
    quarter of a k2-small step; `replaced` checks the slots seen last time instead."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        # every parameter and buffer slot of the model (its dict and name), the tensor it held and that tensor's memory
        self._slots: tuple[list[dict[str, torch.Tensor | None]], list[str]] = ([], [])
        self._held: list[torch.Tensor | None] = []
        self._tensors: list[torch.Tensor] = []
        self._pointers: list[int] = []
        self.weights: DecodeWeights | None = None

    def _snapshot(self) -> None:
        slots = [(tensors, name) for m in self.model.modules() for tensors in (m._parameters, m._buffers)
                 for name in tensors]
        self._slots = ([tensors for tensors, _ in slots], [name for _, name in slots])
        self._held = list(map(dict.get, *self._slots))
        self._tensors = [t for t in self._held if t is not None]
        self._pointers = [t.data_ptr() for t in self._tensors]

    def replaced(self) -> bool:
        """Whether a parameter or buffer slot holds another tensor, or a tensor other memory, than at the last
        rebuild. One identity and one pointer comparison per slot, in `map`s (a Python loop over k2-small's ~380 slots
        cost ~0.2 ms a step)."""
        return any(map(operator.is_not, map(dict.get, *self._slots), self._held)) or \
            list(map(torch.Tensor.data_ptr, self._tensors)) != self._pointers

    def current(self) -> tuple[DecodeWeights, bool]:
        """-> (the weight dict, whether it was rebuilt by this call)."""
        if self.weights is not None and not self.replaced():
            return self.weights, False
        self.weights = decode_weights(self.model)
        self._snapshot()
        return self.weights, True
