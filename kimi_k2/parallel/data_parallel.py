"""Data parallelism for training: every rank holds the replicated parameters and DDP averages their gradients.

With expert parallelism (`expert.py`) the routed experts are rank-local and left out of DDP: each expert's gradient
already arrives summed over every rank's tokens through the all-to-all backward. Muon's Newton-Schulz then runs on
full (all-reduced) matrices, the quantity Distributed Muon (Moonlight §2.3) reconstructs with its DP gather.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from kimi_k2.parallel.world import DistInfo


def wrap_data_parallel(model: torch.nn.Module, info: DistInfo, ignore: list[str] | None = None) -> torch.nn.Module:
    """DDP over all ranks, except the parameters named in `ignore` (rank-local experts under expert parallelism).

    Routed experts a rank's tokens never reach have no gradient there: find_unused_parameters.

    Buffers are synced once at construction, not every forward: the only mutable buffer, e_score_correction_bias,
    is updated identically on every rank from the all-reduced expert load.
    """
    if not info.enabled:
        return model
    if ignore:  # torch has no public spelling of this (torchrec and FSDP use the same hook)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(model, find_unused_parameters=True, forward_sync_buffers=False)
