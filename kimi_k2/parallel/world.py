"""The torchrun world a process belongs to: rank, size, device, and the collectives the trainer and runners use.

Launch (single node):  torchrun --nproc-per-node N -m kimi_k2.cli COMMAND ...
Multi node:            torchrun --nnodes M --node-rank R --nproc-per-node N --rdzv-backend c10d \
                           --rdzv-endpoint HOST0:29500 -m kimi_k2.cli COMMAND ...
The backend follows the device: NCCL for CUDA (rank r on cuda:LOCAL_RANK), gloo for the CPU, so the same code runs
(and is tested) on CPU processes. Every function that communicates takes a process group, the default group when
None; meshes of several dimensions are groups made from this world (`TrainMesh`: FSDP2 shards x expert parallel).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def default_device(local_rank: int = 0) -> torch.device:
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=default_device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | torch.device | None = None, timeout: timedelta | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); a plain process is rank 0 of 1.

    device: this rank's device, cuda:LOCAL_RANK when CUDA is available else the CPU by default; the backend follows.
    timeout: of every collective (torch's default is 30 min for gloo; an idle server's workers wait longer).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=torch.device(device) if device is not None else default_device())
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device(device) if device is not None else default_device(local)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(rank, world, local, dev)


def all_reduce_(t: torch.Tensor, info: DistInfo, op: str = "sum", group: dist.ProcessGroup | None = None
                ) -> torch.Tensor:
    """In place over the ranks of `group` (a no-op in a world of one)."""
    if info.enabled:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return t


def barrier(info: DistInfo, group: dist.ProcessGroup | None = None) -> None:
    if info.enabled:
        dist.barrier(group=group)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class TrainMesh:
    """The FSDP2 + expert-parallel layout of a training world of N = dp_shard ranks (torchtitan's "EP borrows from
    data parallel" layout):

    - `dp` [N]: every parameter outside the routed experts is sharded over all N ranks;
    - `experts` [N / ep, ep] with dims ("efsdp", "ep"): rank = efsdp_index * ep + ep_index. The ep ranks of a row
      split the routed experts (all-to-all dispatch among them: consecutive ranks, one node on a GPU cluster); the
      N / ep ranks of a column hold the same experts and FSDP-shard them.
    Every element of every parameter then lives on exactly one rank.
    """

    dp: DeviceMesh
    experts: DeviceMesh

    @property
    def world(self) -> int:
        return self.dp.size()

    @property
    def ep(self) -> int:
        return self.experts["ep"].size()

    @property
    def ep_rank(self) -> int:
        return self.experts.get_local_rank("ep")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.experts.get_group("ep")

    @property
    def efsdp(self) -> DeviceMesh:
        return self.experts["efsdp"]


def build_train_mesh(info: DistInfo, dp_shard: int, ep: int = 1) -> TrainMesh:
    """The mesh of a world of `dp_shard` ranks with the routed experts split `ep` ways (`TrainMesh`)."""
    if dp_shard != info.world_size:
        raise ValueError(f"[parallel] dp_shard={dp_shard} must equal the world size {info.world_size} (torchrun "
                         "--nnodes x --nproc-per-node)")
    if ep < 1 or dp_shard % ep:
        raise ValueError(f"[parallel] ep={ep} must divide dp_shard={dp_shard}")
    device = info.device.type
    dp = init_device_mesh(device, (dp_shard,), mesh_dim_names=("dp_shard",))
    experts = init_device_mesh(device, (dp_shard // ep, ep), mesh_dim_names=("efsdp", "ep"))
    return TrainMesh(dp, experts)
