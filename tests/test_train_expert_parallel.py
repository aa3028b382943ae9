"""Expert parallelism on 2 gloo ranks (a real torchrun subprocess): same outputs and gradients as the full MoE.

Run by pytest, this file launches itself under `torchrun --nproc-per-node 2`; each rank then runs `worker()`.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist


def worker() -> None:
    from kimi_k2.config import K2Config
    from kimi_k2.model import K2ForCausalLM
    from kimi_k2.parallel import gather_full_state_dict, shard_experts

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref = K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"), dtype=torch.float32).train()
    ep = copy.deepcopy(ref)
    local = shard_experts(ep, rank, world)
    n_experts = ref.config.n_routed_experts
    assert local and all(n_experts // world * rank <= int(n.split(".")[5]) < n_experts // world * (rank + 1)
                         for n in local), local
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own tokens
    x = torch.randint(0, ref.config.vocab_size, (2, 16), generator=g)
    probe = torch.randn(2, 16, ref.config.vocab_size, generator=g)
    out_ref, out_ep = ref(x), ep(x)
    torch.testing.assert_close(out_ep, out_ref, rtol=1e-5, atol=1e-5)
    (out_ref * probe).sum().backward()
    (out_ep * probe).sum().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    for t in ref_grads.values():  # the full-batch gradient: sum over ranks
        dist.all_reduce(t)
    for name, p in ep.named_parameters():
        if name not in local:
            dist.all_reduce(p.grad)  # replicated parameters: data parallel
        # local experts: the all-to-all backward already summed every rank's contribution
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    full = gather_full_state_dict(ep)
    if rank == 0:
        assert full.keys() == ref.state_dict().keys()
        assert all(torch.equal(full[k], v) for k, v in ref.state_dict().items())
    dist.destroy_process_group()


@pytest.mark.slow  # the same shard_experts through the trainer: test_train_distributed's [expert_parallel]
def test_expert_parallel_matches_full_moe_on_two_ranks():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


if __name__ == "__main__":
    worker()
