"""Load time and peak memory of `kimi_k2.checkpoint.load_into` vs an eager load-everything baseline.

    .venv/bin/python benchmarks/bench_load.py [--dir /tmp/k2-bench-ckpt] [--repeats 3]

Writes (once, streaming) a multi-shard block-FP8 checkpoint of a K2-shaped model with a few layers, then runs each
loader in a fresh subprocess and reports wall time and peak RSS (/proc/self/status VmHWM) above the RSS after imports:
- lazy:  load_into(meta model, dir, dtype=bf16): safe_open shard by shard, tensor by tensor;
- eager: safetensors.torch.load_file of every shard into one dict, dequantize every fp8 weight, then
         model.load_state_dict(..., assign=True) (what a naive loader does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import nn

from kimi_k2.checkpoint import CheckpointReader, ShardWriter, dequantize_block_fp8, load_into
from kimi_k2.checkpoint.writer import checkpoint_config, prepare
from kimi_k2.config import K2Config

# K2 shape (MLA, 1 dense + MoE layers, shared expert, 128x128 blocks), widths cut so the fp8 checkpoint is ~300 MB
CONFIG = K2Config.from_preset("k2-small").replace(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, torch_dtype="bfloat16",
)
SHARD_SIZE = 64 * 2**20


def shapes(c: K2Config) -> dict[str, tuple[int, ...]]:
    """Published tensor names and shapes (kimi_k2_formats.md §1.5) for config `c`."""
    h, heads = c.hidden_size, c.num_attention_heads
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_a_proj.weight": (c.q_lora_rank, h),
            p + "self_attn.q_a_layernorm.weight": (c.q_lora_rank,),
            p + "self_attn.q_b_proj.weight": (heads * c.qk_head_dim, c.q_lora_rank),
            p + "self_attn.kv_a_proj_with_mqa.weight": (c.kv_lora_rank + c.qk_rope_head_dim, h),
            p + "self_attn.kv_a_layernorm.weight": (c.kv_lora_rank,),
            p + "self_attn.kv_b_proj.weight": (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
            p + "self_attn.o_proj.weight": (h, heads * c.v_head_dim),
            p + "post_attention_layernorm.weight": (h,),
        }
        if not c.is_moe_layer(i):
            out |= {p + f"mlp.{m}_proj.weight": s for m, s in mlp_shapes(h, c.intermediate_size).items()}
            continue
        e = c.n_routed_experts
        out |= {p + "mlp.gate.weight": (e, h), p + "mlp.gate.e_score_correction_bias": (e,)}
        for e in [f"experts.{e}" for e in range(c.n_routed_experts)] + ["shared_experts"]:
            out |= {p + f"mlp.{e}.{m}_proj.weight": s for m, s in mlp_shapes(h, c.moe_intermediate_size).items()}
    return out | {"model.norm.weight": (h,), "lm_head.weight": (c.vocab_size, h)}


def mlp_shapes(h: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}


def meta_model(names: dict[str, tuple[int, ...]]) -> nn.Module:
    """An nn.Module on the meta device with exactly these parameter names (load_into sees what a model shows it)."""
    root = nn.Module()
    with torch.device("meta"):
        for name, shape in names.items():
            *path, leaf = name.split(".")
            m = root
            for part in path:
                if not hasattr(m, part):
                    m.add_module(part, nn.Module())
                m = getattr(m, part)
            if leaf == "e_score_correction_bias":
                m.register_buffer(leaf, torch.empty(shape))
            else:
                m.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=torch.bfloat16)))
    return root


def write_checkpoint(directory: Path) -> None:
    g = torch.Generator().manual_seed(0)
    with ShardWriter(directory, SHARD_SIZE) as w:
        for name, shape in shapes(CONFIG).items():
            t = torch.randn(shape, generator=g) * 0.02
            w.add(prepare(name, t if name.endswith("_bias") else t.to(torch.bfloat16), fp8=True))
        w.commit(checkpoint_config(CONFIG, True, torch.bfloat16))


def eager_load(model: nn.Module, directory: Path) -> None:
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        sd.update(load_file(directory / shard))
    for name in [n for n, t in sd.items() if t.dtype == torch.float8_e4m3fn]:
        sd[name] = dequantize_block_fp8(sd[name], sd.pop(name + "_scale_inv"))
    model.load_state_dict(sd, assign=True)


def child(kind: str, directory: Path) -> None:
    model = meta_model(shapes(CONFIG))
    base = psutil.Process().memory_info().rss
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "lazy":
        load_into(model, directory, dtype=torch.bfloat16)
    else:
        eager_load(model, directory)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    # VmHWM: this address space's peak RSS (ru_maxrss would also count the forking parent's RSS, kept across exec)
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak_extra": peak - base, "model_bytes": model_bytes}))


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = psutil.virtual_memory().total / 2**30
    return f"{cpu}, nproc={os.cpu_count()}, RAM={ram:.1f} GiB, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/k2-bench-ckpt"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", choices=["lazy", "eager"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.dir)
    if not (args.dir / "config.json").exists():
        write_checkpoint(args.dir)
    reader = CheckpointReader(args.dir)
    shard_max = max((args.dir / s).stat().st_size for s in reader.shards)
    print(f"machine: {machine()}")
    print(f"checkpoint: {args.dir}: {reader.total_bytes / 2**20:.0f} MiB in {len(reader.shards)} shards "
          f"(largest {shard_max / 2**20:.0f} MiB), {len(reader)} tensors")
    runs: dict[str, list[dict]] = {"lazy": [], "eager": []}
    for _ in range(args.repeats):  # interleaved, so both see the same page-cache state
        for kind in runs:
            out = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(args.dir)],
                                 check=True, capture_output=True, text=True).stdout
            runs[kind].append(json.loads(out))
    print(f"{'loader':8}{'wall s':>8}{'CPU s':>8}{'peak RSS over imports':>24}{'bf16 model':>12}  (medians)")
    for kind, r in runs.items():
        med = {key: statistics.median(x[key] for x in r) for key in r[0]}
        print(f"{kind:8}{med['seconds']:>8.2f}{med['cpu']:>8.2f}"
              f"{med['peak_extra'] / 2**20:>20.0f} MiB{med['model_bytes'] / 2**20:>8.0f} MiB")


if __name__ == "__main__":
    main()
