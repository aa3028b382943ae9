"""Model parallelism over torch.distributed, for training and inference alike (device-agnostic: gloo on CPU, NCCL on
CUDA; process groups passed in, the default group when None).

world.py          the torchrun world (rank, size, device), the training mesh, the collectives the trainer uses
data_parallel.py  DDP over the replicated parameters (training)
fsdp.py           FSDP2 sharding over the training mesh with expert parallelism; sharded load, streamed full tensors
expert.py         routed experts split over ranks, all-to-all dispatch/combine (training and inference)
tensor.py         tensor parallelism (inference): MLA by heads, MLPs by columns/rows, vocabulary by rows
loading.py        a rank's part of a checkpoint (its experts and heads), read through the one checkpoint loader
runner.py         lockstep execution: rank 0 drives each step, the other ranks mirror it (`serve --ep`, `generate --ep`)
The model package knows nothing of this one: sharding swaps its modules for the parallel ones here.
"""

from kimi_k2.parallel.data_parallel import wrap_data_parallel
from kimi_k2.parallel.expert import ExpertParallelMoE, expert_range, gather_full_state_dict, shard_experts
from kimi_k2.parallel.loading import load_expert_parallel, load_tensor_parallel
from kimi_k2.parallel.runner import CachedStepper, DistributedRunner, greedy_generate
from kimi_k2.parallel.tensor import TPMLA, shard_attention, shard_tensor_parallel
from kimi_k2.parallel.world import (
    DistInfo,
    TrainMesh,
    all_reduce_,
    barrier,
    build_train_mesh,
    init_distributed,
    shutdown,
)

__all__ = [
    "TPMLA",
    "CachedStepper",
    "DistInfo",
    "DistributedRunner",
    "ExpertParallelMoE",
    "TrainMesh",
    "all_reduce_",
    "barrier",
    "build_train_mesh",
    "expert_range",
    "gather_full_state_dict",
    "greedy_generate",
    "init_distributed",
    "load_expert_parallel",
    "load_tensor_parallel",
    "shard_attention",
    "shard_experts",
    "shard_tensor_parallel",
    "shutdown",
    "wrap_data_parallel",
]
