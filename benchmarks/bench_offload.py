"""Peak RSS and tokens/s of expert offload (`kimi_k2.deploy.offload`) on a multi-GB, full-width K2 checkpoint.

    .venv/bin/python benchmarks/bench_offload.py [--dir /tmp/k2-offload-bench] [--experts 64] [--layers 3]
        [--prompt-len 16] [--new-tokens 8] [--cache-experts 0]

Writes (once, streaming, random values) a block-FP8 checkpoint with every K2 width real (hidden 7168, 64 heads,
q_lora 1536, kv_lora 512, dense intermediate 18432, moe_intermediate 2048, vocab 163840, 8 experts per token) but
few layers (layer 0 dense, the rest MoE) and fewer routed experts. Then, in a fresh process: load_offloaded(bf16),
greedy-generate, and report peak RSS (VmHWM: anonymous + mapped file pages; reset after loading) against the
checkpoint's size, the RSS after loading, the largest file-backed RSS seen after a step, and prefill / decode speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from kimi_k2.checkpoint import CheckpointReader, ShardWriter, is_quantized_name
from kimi_k2.checkpoint.fp8 import SCALE_SUFFIX, scale_shape
from kimi_k2.checkpoint.writer import checkpoint_config
from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM

GB = 1e9


def bench_config(layers: int, experts: int) -> K2Config:
    return K2Config.from_preset("kimi-k2-instruct").replace(num_hidden_layers=layers, n_routed_experts=experts)


def random_fp8(shape: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform over the finite e4m3fn codes (0x7F and 0xFF are NaN), with per-block scales giving |w| <= ~0.05."""
    b = torch.randint(0, 254, shape, dtype=torch.uint8, generator=g)
    b += (b >= 0x7F).to(torch.uint8)  # 0..126, 128..254
    scale = (torch.rand(scale_shape(shape, (128, 128)), generator=g) + 0.5) * (0.035 / 448)
    return b.view(torch.float8_e4m3fn), scale


def write_checkpoint(directory: Path, config: K2Config) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        names = {n: tuple(t.shape) for n, t in K2ForCausalLM(config).state_dict().items()}
    with ShardWriter(directory, 2 * 2**30) as w:
        for name, shape in names.items():
            if is_quantized_name(name):
                q, s = random_fp8(shape, g)
                w.add({name: q, name + SCALE_SUFFIX: s})
            elif name.endswith("e_score_correction_bias"):
                w.add({name: torch.zeros(shape)})
            elif name.endswith("norm.weight"):
                w.add({name: torch.ones(shape, dtype=torch.bfloat16)})
            else:  # embeddings, lm_head, router
                w.add({name: torch.randn(shape, generator=g, dtype=torch.bfloat16) * 0.02})
        w.commit(checkpoint_config(config, True, torch.bfloat16))


def status(field: str) -> int:
    """A byte count from /proc/self/status (VmHWM: peak RSS, RssFile: mapped file pages now)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def child(directory: Path, prompt_len: int, new_tokens: int, cache_experts: int) -> dict:
    from kimi_k2.deploy.offload import load_offloaded
    from kimi_k2.parallel import CachedStepper

    proc = psutil.Process()
    base = proc.memory_info().rss
    t0 = time.perf_counter()
    model = load_offloaded(directory, dtype=torch.bfloat16, cache_experts=cache_experts)
    load_s = time.perf_counter() - t0
    after_load = proc.memory_info().rss
    load_peak = status("VmHWM")
    reset_peak_rss()
    step = CachedStepper(model, prompt_len + new_tokens)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    logits = step({"input_ids": prompt.tolist(), "reset": True})
    prefill_s = time.perf_counter() - t0
    max_file = status("RssFile")
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = step({"input_ids": logits.argmax(-1)[:, None].tolist()})
        max_file = max(max_file, status("RssFile"))
    decode_s = time.perf_counter() - t0
    store = model.model.layers[1].mlp.experts[0].store
    return {
        "rss_after_imports": base, "rss_after_load": after_load, "load_peak_rss": load_peak,
        "generate_peak_rss": status("VmHWM"), "max_rss_file_after_step": max_file, "load_s": load_s,
        "prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": (new_tokens - 1) / decode_s,
        "expert_dequantizations": store.dequantized,
        "param_bytes": sum(t.nbytes for t in model.state_dict().values()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("/tmp/k2-offload-bench"))
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--cache-experts", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.dir, a.prompt_len, a.new_tokens, a.cache_experts)))
        return
    config = bench_config(a.layers, a.experts)
    if not (a.dir / "config.json").is_file() or K2Config.from_pretrained(a.dir).n_routed_experts != a.experts:
        t0 = time.perf_counter()
        write_checkpoint(a.dir, config)
        print(f"wrote {a.dir} in {time.perf_counter() - t0:.0f} s")
    reader = CheckpointReader(a.dir)
    total = sum(f.stat().st_size for f in a.dir.glob("*.safetensors"))
    expert = sum(torch.Size(reader.info[n][1]).numel() * reader.info[n][0].itemsize
                 for n in reader.weight_map if ".mlp.experts." in n)
    expert_bf16 = sum(2 * torch.Size(reader.shape(n)).numel() for n in reader if ".mlp.experts." in n)
    cmd = [sys.executable, __file__, "--child", "--dir", str(a.dir), "--prompt-len", str(a.prompt_len),
           "--new-tokens", str(a.new_tokens), "--cache-experts", str(a.cache_experts)]
    r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    mem = psutil.virtual_memory().total
    print(f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
          f"{mem / GB:.1f} GB RAM, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"checkpoint: {a.layers} layers, {a.experts} experts, {total / GB:.2f} GB on disk "
          f"(routed experts {expert / GB:.2f} GB fp8); a full bf16 load would hold "
          f"{(r['param_bytes'] + expert_bf16) / GB:.2f} GB")
    print(f"resident params {r['param_bytes'] / GB:.2f} GB; RSS after imports {r['rss_after_imports'] / GB:.2f}, "
          f"after load {r['rss_after_load'] / GB:.2f}, peak while loading {r['load_peak_rss'] / GB:.2f}, peak while "
          f"generating {r['generate_peak_rss'] / GB:.2f} GB (= {r['generate_peak_rss'] / total:.0%} of the "
          f"checkpoint); max file-backed RSS after a step {r['max_rss_file_after_step'] / GB:.3f} GB")
    print(f"load {r['load_s']:.1f} s; prefill {a.prompt_len} tokens {r['prefill_tok_s']:.2f} tok/s; decode "
          f"{r['decode_tok_s']:.3f} tok/s; {r['expert_dequantizations']} expert dequantizations "
          f"(cache_experts={a.cache_experts})")


if __name__ == "__main__":
    main()
