"""K2ForCausalLM vs transformers DeepseekV3ForCausalLM on CPU: prefill and greedy decode, same weights.

    .venv/bin/python benchmarks/bench_model_forward.py [--preset k2-small] [--prompt 256] [--new 64] [--batch 1]
        [--dtype float32|bfloat16] [--threads 1] [--repeats 3]

Prefill: one full-sequence forward of `prompt` tokens (ours: cache=None, SDPA; HF: use_cache=False).
Decode: prefill into a cache, then `new` greedy steps (ours: DenseLatentCache, absorbed MLA; HF: generate() with its
DynamicCache of per-head K/V). Reports the best of `repeats` interleaved rounds and checks both pick the same greedy
tokens.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
import transformers
from timing import best_of

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.dense_cache import DenseLatentCache


@torch.no_grad()
def ours_generate(model: K2ForCausalLM, ids: torch.Tensor, new: int) -> torch.Tensor:
    B, S = ids.shape
    cache = DenseLatentCache.for_model(model.config, B, S + new, dtype=torch.float32)
    cache.begin([S] * B)
    logits = model(ids, cache.positions(S), cache)[:, -1]
    cache.end()
    out = []
    for _ in range(new):
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        cache.begin([1] * B)
        logits = model(tok, cache.positions(1), cache)[:, -1]
        cache.end()
    return torch.cat(out, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="k2-small")
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = K2Config.from_preset(args.preset)
    torch.manual_seed(0)
    ours = K2ForCausalLM.from_config(config, dtype).eval()
    with torch.no_grad():
        for t in ours.parameters():
            if t.ndim == 2:
                t.normal_(0.0, 1.0 / t.shape[1] ** 0.5)
    hf_cfg = transformers.DeepseekV3Config(**{**config.to_dict(), "model_type": "deepseek_v3"})
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).to(dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)  # strict=False: HF's rotary inv_freq is not a checkpoint tensor
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        pre = best_of({"ours": lambda: ours(ids), "hf": lambda: hf(ids, use_cache=False).logits}, args.repeats)
    gen = best_of({
        "ours": lambda: ours_generate(ours, ids, args.new),
        "hf": lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                  min_new_tokens=args.new, do_sample=False, pad_token_id=0)[:, args.prompt:],
    }, args.repeats)
    same = (gen["ours"][2] == gen["hf"][2]).float().mean().item()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {args.threads}")
    print(f"{args.preset} {args.dtype} batch {args.batch}, prompt {args.prompt}, new {args.new}; "
          f"same greedy tokens {100 * same:.0f}%")
    for what, r, n in (("prefill", pre, args.batch * args.prompt), ("generate", gen, args.batch * args.new)):
        (wo, co, _), (wh, ch, _) = r["ours"], r["hf"]
        print(f"{what:<9} ours wall {wo:7.3f} s cpu {co:7.3f} s ({n / co:7.1f} tok/cpu-s)   "
              f"HF wall {wh:7.3f} s cpu {ch:7.3f} s ({n / ch:7.1f} tok/cpu-s)   speed-up (cpu) {ch / co:.2f}x")


if __name__ == "__main__":
    main()
