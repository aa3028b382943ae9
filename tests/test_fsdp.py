"""FSDP2 + expert parallelism on 4 gloo ranks (one real torchrun, the checks share its processes) against one process:

- gradients of the global-batch loss (the experts' divide factor), for ep = 1, 2, 4, and with activation
  checkpointing;
- distributed MuonClip (NS of each whole matrix once, by an owner rank) bitwise equal to single-process MuonClip,
  per-head blocks, experts and the AdamW group included, and each matrix orthogonalized exactly once;
- QK-Clip with per-rank max logits on row-sharded weights whose heads straddle ranks: the same heads, same weights;
- the streamed export's full tensors, the memory held per rank against total / N;
- bf16 mixed precision: gathered weights bf16 in forward, fp32 masters and gradients;
- loading a block-FP8 checkpoint straight into the shards (each rank its rows and experts) equals a whole load.
Run by pytest, this file launches itself under `torchrun --nproc-per-node 4`; each rank then runs `worker()`.
"""

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

WORLD = 4


def check(ok: bool, msg: str) -> None:
    if not ok:
        raise AssertionError(f"rank {dist.get_rank()}: {msg}")


def as_sharded(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out like the (DTensor) parameter `like`: this rank's rows, no communication."""
    from torch.distributed.tensor import DTensor

    from kimi_k2.parallel.fsdp import local_rows, row_counts

    if not isinstance(like, DTensor):
        return full.clone()
    _, start = local_rows(like)
    n = row_counts(full.shape[0], like.device_mesh.size())[like.device_mesh.get_local_rank()]
    return DTensor.from_local(full[start : start + n].clone(), like.device_mesh, like.placements, shape=full.shape,
                              stride=full.stride())


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def build(ep: int, param_dtype=torch.float32, activation_checkpointing: bool = False):
    from kimi_k2.config import K2Config
    from kimi_k2.model import K2ForCausalLM
    from kimi_k2.parallel import DistInfo
    from kimi_k2.parallel.fsdp import parallelize
    from kimi_k2.parallel.world import build_train_mesh

    torch.manual_seed(0)
    # 6 heads: q_b_proj (144 rows) and kv_b_proj (192 rows) split into 36 / 48 rows per rank, so heads straddle ranks
    config = K2Config.from_preset("k2-tiny").replace(num_attention_heads=6)
    ref = K2ForCausalLM.from_config(config, dtype=torch.float32).train()
    model = copy.deepcopy(ref)
    info = DistInfo(dist.get_rank(), WORLD, dist.get_rank(), torch.device("cpu"))
    experts = parallelize(model, build_train_mesh(info, WORLD, ep), param_dtype,
                          activation_checkpointing=activation_checkpointing)
    return ref, model, experts


def check_gradients(ep: int, activation_checkpointing: bool = False) -> None:
    ref, model, _ = build(ep, activation_checkpointing=activation_checkpointing)
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, ref.config.vocab_size, (2 * WORLD, 12), generator=g)
    y = torch.randint(0, ref.config.vocab_size, (2 * WORLD, 12), generator=g)
    F.cross_entropy(ref(x).flatten(0, 1), y.flatten(), reduction="sum").div(y.numel()).backward()
    mine = slice(2 * rank, 2 * rank + 2)
    calls = []
    model.model.layers[1].mlp.register_forward_pre_hook(lambda m, args: calls.append(1))
    # each rank's CE sum scaled by world / (global targets): FSDP's average over ranks gives the global mean
    loss = F.cross_entropy(model(x[mine]).flatten(0, 1), y[mine].flatten(), reduction="sum") * (WORLD / y.numel())
    loss.backward()
    check(len(calls) == (2 if activation_checkpointing else 1), f"the MoE ran {len(calls)} times")
    refs = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = refs[name].grad
        if want is None:  # an expert no token reached: FSDP reduce-scatters zeros for it
            check(p.grad is None or not full(p.grad).any(), f"ep={ep} {name}: gradient without tokens")
            continue
        torch.testing.assert_close(full(p.grad), want, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=name: f"ep={ep} {n}: {m}")


def check_muonclip(ep: int) -> None:
    from kimi_k2.parallel.fsdp import stream_full_state_dict
    from kimi_k2.train import MuonClip, param_groups
    from kimi_k2.train.memory import measure
    from kimi_k2.train.qk_clip import QKClip

    ref, model, experts = build(ep)
    ref_opt = MuonClip(param_groups(ref, lr=0.02, per_head=True), lr=0.02, weight_decay=0.1)
    opt = MuonClip(param_groups(model, lr=0.02, per_head=True), lr=0.02, weight_decay=0.1)
    refs = dict(ref.named_parameters())
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        grads = {n: torch.randn(p.shape, generator=g) for n, p in ref.named_parameters()}
        for n in ("model.layers.1.mlp.experts.5.up_proj.weight", "model.layers.2.mlp.experts.0.down_proj.weight"):
            grads[n] = None  # experts that got no token: no gradient, no update (in both)
        for n, p in ref.named_parameters():
            p.grad = grads[n]
        for n, p in model.named_parameters():
            p.grad = None if grads[n] is None else as_sharded(grads[n], p)
        ref_opt.step()
        opt.step()
        for n, p in model.named_parameters():
            check(torch.equal(full(p), refs[n].detach()), f"ep={ep} step {step}: {n} differs from one process")
        done = torch.tensor(opt.ns_stats.matrices)
        dist.all_reduce(done)
        check(done.item() == ref_opt.ns_stats.matrices, f"ep={ep}: {done.item()} matrices orthogonalized over the "
                                                        f"ranks, {ref_opt.ns_stats.matrices} in one process")
        check(opt.ns_stats.matrices < ref_opt.ns_stats.matrices, f"ep={ep}: a rank orthogonalized every matrix")
    memory = measure(model, opt, experts, ep, WORLD)
    check(memory.held <= 1.1 * memory.total / WORLD, f"ep={ep}: holds {memory.held} B of {memory.total} B")
    check(memory.held + memory.ns_gathered <= 1.1 * memory.sharded_target,
          f"ep={ep}: {memory.held} + {memory.ns_gathered} B over {memory.sharded_target}")

    # QK-Clip: each rank saw its own max logits; the max over ranks decides, rows of a head on two ranks both scale
    g = torch.Generator().manual_seed(5)
    S = torch.rand(WORLD, ref.config.num_hidden_layers, ref.config.num_attention_heads, generator=g) * 40
    S[dist.get_rank() % WORLD, :, 1] += 100  # head 1 over tau somewhere
    ref_clip, clip = QKClip(ref, tau=30.0), QKClip(model, tau=30.0)
    for (_, a), s in zip(ref_clip.layers, S.amax(dim=0), strict=True):
        a.max_logits = s
    for (_, a), s in zip(clip.layers, S[dist.get_rank()], strict=True):
        a.max_logits = s
    want, got = ref_clip.apply(), clip.apply()
    check(torch.equal(want.gamma, got.gamma) and int(got.heads_clipped.sum()) >= 3, f"ep={ep}: clipped heads differ")
    for n, p in model.named_parameters():
        check(torch.equal(full(p), refs[n].detach()), f"ep={ep} QK-Clip: {n} differs from one process")

    # the export stream: every full tensor, in the unsharded model's order, on rank 0
    names = list(ref.state_dict())
    streamed = [(n, t) for n, t in stream_full_state_dict(model, names)]
    check([n for n, _ in streamed] == names, "export order")
    if dist.get_rank() == 0:
        ref_sd = ref.state_dict()
        for n, t in streamed:
            check(torch.equal(t, ref_sd[n]), f"ep={ep} export: {n}")
    else:
        check(all(t is None for _, t in streamed), "export: a rank other than 0 got tensors")


def check_mixed_precision() -> None:
    ref, model, _ = build(2, param_dtype=torch.bfloat16)
    seen = []
    attn = model.model.layers[0].self_attn
    attn.q_b_proj.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
    x = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(dist.get_rank()))
    out = model(x)
    want = ref(x)
    check(seen == [torch.bfloat16], f"forward ran on {seen}")
    torch.testing.assert_close(out, want, rtol=0.05, atol=0.05)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        check(p.dtype == torch.float32, f"master {n} is {p.dtype}")
        check(p.grad is None or p.grad.dtype == torch.float32, f"gradient of {n} is {p.grad.dtype}")


def check_sharded_load(directory: Path) -> None:
    """A model sharded on the meta device, each rank reading only its rows (and experts) of a block-FP8 checkpoint
    whose 128-row blocks straddle the ranks' rows, equals the model loaded whole."""
    from kimi_k2.model import K2ForCausalLM
    from kimi_k2.parallel import DistInfo
    from kimi_k2.parallel.fsdp import load_sharded, parallelize
    from kimi_k2.parallel.world import build_train_mesh

    ref, _, _ = build(2)
    if dist.get_rank() == 0:
        ref.save_pretrained(directory, fp8=True)
    dist.barrier()
    whole = K2ForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.device("meta"):
        model = K2ForCausalLM(ref.config)
    info = DistInfo(dist.get_rank(), WORLD, dist.get_rank(), torch.device("cpu"))
    experts = parallelize(model, build_train_mesh(info, WORLD, 2))
    model.to_empty(device="cpu")
    read = load_sharded(model, str(directory))
    read_experts = [n for n in read if ".experts." in n]
    check(sorted(read_experts) == sorted(experts) and len(experts) == 2 * 4 * 3,  # 2 MoE layers x 4 experts x 3
          f"read expert tensors {read_experts}")
    want = whole.state_dict()
    for n, t in model.state_dict().items():
        check(torch.equal(full(t), want[n]), f"sharded load: {n}")


def worker() -> None:
    dist.init_process_group("gloo")
    torch.use_deterministic_algorithms(True)
    for ep in (1, 2, 4):
        check_gradients(ep)
    check_gradients(2, activation_checkpointing=True)  # the recompute repeats the all-to-alls in backward
    for ep in (2, 4):
        check_muonclip(ep)
    check_mixed_precision()
    check_sharded_load(Path(os.environ["KIMI_TEST_DIR"]) / "fp8")
    dist.destroy_process_group()


def test_fsdp2_expert_parallel_matches_one_process_on_four_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
           "KIMI_TEST_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]


if __name__ == "__main__":
    worker()
