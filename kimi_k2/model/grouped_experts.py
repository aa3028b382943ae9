"""`moe.Experts` for inference: the routed SwiGLU experts packed as two stacks, gate | up [E, 2I, D] and down
[E, D, I] (each expert's weights become views of its rows: same modules and state_dict, no copy), run by
`functional.expert_mlp`: each expert's rows are one product on the `kimi_k2.ops.kernels` CPU kernels, in float, fp16 or
int8 alike. The engine swaps it in at load; the compiled decode reads the same stacks.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from ..ops.layout import pack_rows
from ..ops.quantize import QuantizedLinear
from .functional import expert_mlp

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
Stack = tuple[torch.Tensor, torch.Tensor | None]  # weights [E, N, K] and int8 scales [E, N, K/32] (or None)


def groupable(experts: nn.ModuleList) -> bool:
    """Every expert a SwiGLU MLP of bias-free projections: float nn.Linears of one dtype, or QuantizedLinears of one
    format."""
    linears = [getattr(e, p, None) for e in experts for p in PROJECTIONS]
    if all(isinstance(m, nn.Linear) and m.bias is None and m.weight.is_floating_point() for m in linears):
        return len({m.weight.dtype for m in linears}) == 1
    return all(isinstance(m, QuantizedLinear) and m.bias is None for m in linears) and len(
        {m.fmt for m in linears}) == 1


def expert_stacks(experts: nn.ModuleList) -> tuple[Stack, Stack]:
    """(gate | up, down) stacks of the experts, packing them (in place, no copy once packed) if they are not yet."""
    out = []
    with torch.no_grad():
        for groups in ([[e.gate_proj, e.up_proj] for e in experts], [[e.down_proj] for e in experts]):
            scales = pack_rows(groups, "scales") if getattr(groups[0][0], "scales", None) is not None else None
            out.append((pack_rows(groups, "weight"), scales))
    return out[0], out[1]


class GroupedExperts(nn.ModuleList):
    def __init__(self, experts: nn.ModuleList) -> None:
        if not groupable(experts):
            raise ValueError("packed experts need SwiGLU experts of bias-free projections of one dtype / format")
        super().__init__(experts)
        self._linears = [getattr(e, p) for e in self for p in PROJECTIONS]
        self._stacks, self._weights = expert_stacks(self), self._current()

    def _current(self) -> list[torch.Tensor]:
        return [m.weight for m in self._linears]

    def stacks(self) -> tuple[Stack, Stack]:
        """The packed stacks; packed again if an expert's weight was replaced since (in-place updates need not)."""
        if not all(map(operator.is_, self._current(), self._weights)):
            self._stacks, self._weights = expert_stacks(self), self._current()
        return self._stacks

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of x [P, D] grouped by expert in expert order, counts [E] rows per expert -> expert outputs [P, D]."""
        ids = torch.repeat_interleave(torch.arange(len(self), device=x.device), counts)
        return expert_mlp(x.float(), ids, *self.stacks()).to(x.dtype)
