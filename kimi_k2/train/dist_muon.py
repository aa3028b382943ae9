"""Newton-Schulz for Muon on row-sharded (FSDP2 DTensor) parameters: each matrix orthogonalized once, by one rank.

Muon's update needs NS of the whole logical matrix, not of a rank's rows. Per shard group (the ranks a parameter's
rows are split over; Moonlight §2.3's "DP gather", without every rank redoing every matrix):
    1. every matrix gets an owner rank: longest-processing-time first by NS cost (rows * cols * min(rows, cols) per
       block), so the owners' work is balanced and the assignment is the same on every rank;
    2. one all_to_all sends each rank's rows of every update U to its owner, which stacks them into the full U;
    3. each owner runs NS on its matrices, same-shape matrices as one batch, exactly as the single-process step does
       (Moonlight: ns_steps 5, RMS matching applied by the caller);
    4. a second all_to_all sends every rank its rows of each O = NS(U).
Traffic per rank per step: its shard of U out and its shard of O back (~ 2 x 1/N of the Muon parameters, in the NS
dtype), memory: the full matrices a rank owns. Matrices whose rows are not split (plain tensors, one-rank meshes)
are orthogonalized locally.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from kimi_k2.parallel.fsdp import row_counts, shard_group


@dataclass
class Matrix:
    """One Muon parameter of a step: `u` this rank's rows of the NS input (in the parameter's layout), `shape` the
    parameter's global shape, `block_rows` the rows of each independently orthogonalized block (None: all rows)."""

    param: Tensor
    u: Tensor
    shape: torch.Size
    block_rows: int | None
    ns_key: tuple  # (steps, coefficients, eps, dtype): matrices with equal keys may share an NS batch

    @property
    def blocks(self) -> tuple[int, int, int]:  # (count, rows, cols) of the 2-D matrices NS sees
        rows = self.block_rows or self.shape[-2]
        return math.prod(self.shape) // (rows * self.shape[-1]), rows, self.shape[-1]

    @property
    def cost(self) -> int:
        n, r, c = self.blocks
        return n * r * c * min(r, c)

    @property
    def u_bytes(self) -> int:  # the whole matrix, in the NS dtype
        return math.prod(self.shape) * self.ns_key[3].itemsize


@dataclass
class NSStats:
    """What the last step's NS did on this rank (for tests, logs and the benchmark)."""

    matrices: int = 0  # 2-D matrices orthogonalized here
    ns_seconds: float = 0.0  # wall-clock
    ns_cpu_seconds: float = 0.0  # CPU time of this process (steadier than wall-clock on a shared machine)
    comm_seconds: float = 0.0
    gathered_bytes: int = 0  # most bytes of whole matrices (owned U and O) this rank held at once
    rounds: int = 0  # all_to_all round trips


NSFn = Callable[[Tensor, tuple], Tensor]  # [n, min, max] NS input, ns_key -> output (in the key's dtype)


def orthogonalize_buckets(full: list[tuple[Tensor, Matrix]], ns: NSFn) -> list[Tensor]:
    """NS of whole matrices (u in the parameter's shape), bucketed by (ns_key, [min, max]) block shape -> O in the
    parameter's shape (NS dtype). The single-process step and the owners both come through here."""
    buckets: dict[tuple, list[int]] = defaultdict(list)
    views: list[tuple[Tensor, bool]] = []
    for i, (u, m) in enumerate(full):
        _, rows, cols = m.blocks
        tall = rows > cols
        v = u.reshape(-1, rows, cols)
        views.append((v.mT if tall else v, tall))
        buckets[(m.ns_key, min(rows, cols), max(rows, cols))].append(i)
    out: list[Tensor | None] = [None] * len(full)
    for (key, _, _), idx in buckets.items():
        U = torch.cat([views[i][0] for i in idx])
        O = ns(U, key)
        for i, o in zip(idx, O.split([views[i][0].shape[0] for i in idx]), strict=True):
            out[i] = (o.mT if views[i][1] else o).reshape(full[i][1].shape)
    return out  # type: ignore[return-value]


def schedule(matrices: list[Matrix], world: int) -> list[list[tuple[int, int]]]:
    """Rounds of (matrix index, owner rank): largest NS cost first, each to the rank with the least work so far in the
    round, a new round when that rank's gathered U would pass the largest matrix's size. So every rank holds at most
    about one largest matrix at a time, and the same assignment is computed everywhere."""
    budget = max(m.u_bytes for m in matrices)
    rounds: list[list[tuple[int, int]]] = [[]]
    used, work = [0] * world, [0] * world
    for i in sorted(range(len(matrices)), key=lambda i: (-matrices[i].cost, i)):
        r = min(range(world), key=lambda r: (work[r], r))
        if used[r] and used[r] + matrices[i].u_bytes > budget:
            rounds.append([])
            used, work = [0] * world, [0] * world
            r = 0
        rounds[-1].append((i, r))
        used[r] += matrices[i].u_bytes
        work[r] += matrices[i].cost
    return rounds


def orthogonalize_sharded(matrices: list[Matrix], ns: NSFn, stats: NSStats) -> list[Tensor]:
    """O = NS(U) for every matrix, as this rank's rows (in the parameter's local layout) -> list like `matrices`."""
    out: list[Tensor | None] = [None] * len(matrices)
    groups: dict[int, tuple[dist.ProcessGroup | None, list[int]]] = {}
    for i, m in enumerate(matrices):
        g = shard_group(m.param)
        if g is not None and g.size() == 1:
            g = None
        groups.setdefault(id(g) if g is not None else 0, (g, []))[1].append(i)
    for group, idx in groups.values():
        if group is None:  # whole matrices here
            t0, c0 = time.perf_counter(), time.process_time()
            for i, o in zip(idx, orthogonalize_buckets([(matrices[i].u, matrices[i]) for i in idx], ns), strict=True):
                out[i] = o
            stats.ns_seconds += time.perf_counter() - t0
            stats.ns_cpu_seconds += time.process_time() - c0
            stats.matrices += sum(matrices[i].blocks[0] for i in idx)
            continue
        for i, o in zip(idx, _exchange(group, [matrices[i] for i in idx], ns, stats), strict=True):
            out[i] = o
    return out  # type: ignore[return-value]


def _exchange(group: dist.ProcessGroup, matrices: list[Matrix], ns: NSFn, stats: NSStats) -> list[Tensor]:
    W = group.size()
    dtypes = {m.ns_key[3] for m in matrices}
    wire = dtypes.pop() if len(dtypes) == 1 else torch.float32  # NS casts to its dtype first: sending it is exact
    out: list[Tensor | None] = [None] * len(matrices)
    rounds = schedule(matrices, W)
    stats.rounds += len(rounds)
    for rnd in rounds:
        outs = _round(group, [(matrices[i], owner) for i, owner in rnd], wire, ns, stats)
        for (i, _), o in zip(rnd, outs, strict=True):
            out[i] = o
    return out  # type: ignore[return-value]


def _round(group: dist.ProcessGroup, work: list[tuple[Matrix, int]], wire: torch.dtype, ns: NSFn,
           stats: NSStats) -> list[Tensor]:
    """One round: each rank's rows of every U to its owner, NS by the owners, each rank's rows of every O back."""
    W, me = group.size(), group.rank()
    counts = [row_counts(m.shape[0], W) for m, _ in work]
    row_numel = [math.prod(m.shape[1:]) for m, _ in work]
    mine = [i for i, (_, owner) in enumerate(work) if owner == me]
    device = work[0][0].u.device
    empty = torch.empty(0, dtype=wire, device=device)

    t0 = time.perf_counter()
    send = [torch.cat([m.u.reshape(-1).to(wire) for m, owner in work if owner == dst] or [empty])
            for dst in range(W)]
    send_splits = [t.numel() for t in send]
    recv_splits = [sum(counts[i][src] * row_numel[i] for i in mine) for src in range(W)]
    recv = torch.empty(sum(recv_splits), dtype=wire, device=device)
    dist.all_to_all_single(recv, torch.cat(send), recv_splits, send_splits, group=group)
    stats.comm_seconds += time.perf_counter() - t0

    # the owner stacks each full U from the ranks' rows (rank order = row order) and runs NS
    t0, c0 = time.perf_counter(), time.process_time()
    parts: dict[int, list[Tensor]] = {i: [] for i in mine}
    for src, chunk in enumerate(recv.split(recv_splits)):
        off = 0
        for i in mine:
            n = counts[i][src] * row_numel[i]
            parts[i].append(chunk[off : off + n].view(counts[i][src], *work[i][0].shape[1:]))
            off += n
    full = [(torch.cat(parts[i]), work[i][0]) for i in mine]
    O = orthogonalize_buckets(full, ns)
    stats.ns_seconds += time.perf_counter() - t0
    stats.ns_cpu_seconds += time.process_time() - c0
    stats.matrices += sum(work[i][0].blocks[0] for i in mine)
    stats.gathered_bytes = max(stats.gathered_bytes, sum(u.nbytes + o.nbytes for (u, _), o in zip(full, O,
                                                                                                  strict=True)))

    t0 = time.perf_counter()
    back = [o[sum(counts[i][:dst]) : sum(counts[i][: dst + 1])].reshape(-1).to(wire)
            for dst in range(W) for i, o in zip(mine, O, strict=True)]
    back_splits = [sum(counts[i][dst] * row_numel[i] for i in mine) for dst in range(W)]
    got_splits = [sum(counts[i][me] * row_numel[i] for i, (_, owner) in enumerate(work) if owner == src)
                  for src in range(W)]
    got = torch.empty(sum(got_splits), dtype=wire, device=device)
    dist.all_to_all_single(got, torch.cat(back or [empty]), got_splits, back_splits, group=group)
    stats.comm_seconds += time.perf_counter() - t0
    out: list[Tensor | None] = [None] * len(work)
    for src, chunk in enumerate(got.split(got_splits)):
        off = 0
        for i, (m, owner) in enumerate(work):
            if owner == src:
                n = counts[i][me] * row_numel[i]
                out[i] = chunk[off : off + n].view(counts[i][me], *m.shape[1:])
                off += n
    return out  # type: ignore[return-value]
