"""`moe.Experts` for inference: the routed SwiGLU experts as three grouped GEMMs (`torch._grouped_mm`, one call per
projection for all experts) instead of three matmuls per active expert. The engine swaps it in at load.

Same expert modules and state_dict names (it is the same ModuleList); their weights become views of [E, ...] stacks
(`kimi_k2.ops.layout.stack_parameters`), which the grouped GEMM reads directly, with no copy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.layout import stack_parameters, stacked_view
from .functional import swiglu

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def groupable(experts: nn.ModuleList) -> bool:
    """Every expert a SwiGLU MLP of plain float nn.Linear projections without bias, all of one dtype."""
    linears = [getattr(e, p, None) for e in experts for p in PROJECTIONS]
    return all(isinstance(m, nn.Linear) and m.bias is None and m.weight.is_floating_point() for m in linears) and len(
        {m.weight.dtype for m in linears}) == 1


class GroupedExperts(nn.ModuleList):
    def __init__(self, experts: nn.ModuleList) -> None:
        if not groupable(experts):
            raise ValueError("grouped experts need SwiGLU experts of bias-free float nn.Linear projections")
        super().__init__(experts)
        with torch.no_grad():
            for proj in PROJECTIONS:
                stack_parameters([getattr(e, proj) for e in self], "weight")

    def _stacks(self) -> list[torch.Tensor]:
        """[E, I, D] gate, [E, I, D] up, [E, D, I] down; restacked if a weight was replaced since."""
        stacks = []
        for proj in PROJECTIONS:
            view = stacked_view([getattr(e, proj).weight.detach() for e in self])
            if view is None:
                with torch.no_grad():
                    view = stack_parameters([getattr(e, proj) for e in self], "weight")
            stacks.append(view)
        return stacks

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of x [P, D] grouped by expert in expert order, counts [E] rows per expert -> expert outputs [P, D]."""
        gate, up, down = self._stacks()
        offs = counts.cumsum(0).to(torch.int32)
        x = x.to(gate.dtype)
        h = swiglu(torch._grouped_mm(x, gate.transpose(1, 2), offs=offs),
                   torch._grouped_mm(x, up.transpose(1, 2), offs=offs))
        return torch._grouped_mm(h, down.transpose(1, 2), offs=offs)
