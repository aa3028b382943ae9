"""Learning-rate schedules: linear warmup, then WSD (warmup-stable-decay) or cosine.

A schedule is a pure function of the optimizer step, so resuming only needs the step count.
K2 (arXiv 2507.20534 §2.5): 500 warmup steps, constant 2e-4, then cosine decay to 2e-5 (min_lr_ratio 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("wsd", "cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    kind: str = "wsd"
    warmup_steps: int = 0
    total_steps: int = 1
    decay_fraction: float = 0.2  # WSD: share of total_steps spent decaying at the end
    min_lr_ratio: float = 0.1  # lr at the last step = peak * min_lr_ratio

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule kind {self.kind!r} unknown; expected one of {KINDS}")
        if self.total_steps < 1:
            raise ValueError(f"schedule total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"schedule warmup_steps must be in 0..total_steps, got {self.warmup_steps}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(f"schedule decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"schedule min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def __call__(self, step: int) -> float:
        """Multiplier of the peak lr for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        last = self.total_steps - 1
        if self.kind == "cosine":
            start = self.warmup_steps
        else:
            start = max(self.warmup_steps, self.total_steps - round(self.decay_fraction * self.total_steps))
        if step < start or last <= start:
            return 1.0
        # cosine from 1 at `start` to min_lr_ratio at the last step (K2's decay phase is a cosine too)
        t = min(1.0, (step - start) / (last - start))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr to its peak (`initial_lr`, recorded on first call) times the schedule; return group 0's."""
    mult = schedule(step)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * mult
    return optimizer.param_groups[0]["lr"]
