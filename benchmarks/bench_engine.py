"""LLMEngine vs transformers `generate()` on CPU: same K2-shaped model, same weights, greedy, side by side.

    .venv/bin/python benchmarks/bench_engine.py [--preset k2-small] [--prompt 64] [--new 64] [--concurrent 32]
        [--threads 1] [--repeats 3] [--compile]

1. single stream: one request, `prompt` tokens in, `new` greedy tokens out (ours: LLMEngine with the paged latent
   cache; HF: DeepseekV3ForCausalLM.generate with its per-head DynamicCache). Decode tok/s = (new - 1) / (time of
   the whole request - time of the same request with new = 1), so both exclude prefill alike.
2. throughput: `concurrent` such requests through one LLMEngine (continuous batching), generated tokens / time.
3. cache bytes per token: the engine's page pool vs the MLA formula, and what a per-head cache would take.
Times are the best of `repeats` interleaved rounds, in CPU seconds (process_time, all threads: steadier than wall
time on a shared machine) and wall seconds. `--compile` runs our engine with `EngineConfig(compile_decode=True)`
(single-stream decode steps through one torch.compile'd graph); its compile time (the warm-up) is printed apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import torch
import transformers
from timing import best_of

from kimi_k2.config import K2Config
from kimi_k2.engine import EngineConfig, LLMEngine, SamplingParams
from kimi_k2.engine.engine_config import latent_bytes_per_token, per_head_bytes_per_token
from kimi_k2.engine.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="k2-small")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="EngineConfig(compile_decode=True) for our engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = K2Config.from_preset(args.preset)
    ours = load_model(args.preset, torch.float32)
    hf_cfg = transformers.DeepseekV3Config(**{**config.to_dict(), "model_type": "deepseek_v3"})
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)  # strict=False: HF's rotary inv_freq is not a checkpoint tensor
    rng = random.Random(1)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(args.prompt)] for _ in range(args.concurrent)]
    pages = -(-(args.prompt + args.new) // 16) * args.concurrent
    ecfg = EngineConfig(page_size=16, num_pages=pages, max_model_len=args.prompt + args.new,
                        max_num_seqs=args.concurrent, enable_prefix_caching=False, compile_decode=args.compile)

    def engine_run(ps: list[list[int]], new: int) -> list[list[int]]:
        engine = LLMEngine(ours, config=ecfg)
        res = engine.generate(ps, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
        return [r[0].token_ids for r in res]

    def hf_run(new: int) -> list[int]:
        ids = torch.tensor([prompts[0]])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        return out[0, args.prompt:].tolist()

    start = time.perf_counter()
    engine_run(prompts[:1], 2)  # warm-up (with --compile: the compile)
    warmup = time.perf_counter() - start
    hf_run(2)
    r = best_of({
        "ours_1": lambda: engine_run(prompts[:1], 1), "ours_n": lambda: engine_run(prompts[:1], args.new),
        "hf_1": lambda: hf_run(1), "hf_n": lambda: hf_run(args.new),
        "batch_1": lambda: engine_run(prompts, 1), "batch_n": lambda: engine_run(prompts, args.new),
    }, args.repeats)
    same = sum(a == b for a, b in zip(r["ours_n"][2][0], r["hf_n"][2], strict=True)) / args.new
    batch_same = r["batch_n"][2][0] == r["ours_n"][2][0]

    def decode_rate(k: str, i: int, streams: int = 1) -> float:
        return streams * (args.new - 1) / (r[f"{k}_n"][i] - r[f"{k}_1"][i])

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__} threads {args.threads}, transformers "
          f"{transformers.__version__}")
    print(f"{args.preset} float32, prompt {args.prompt}, new {args.new}; greedy tokens equal to HF: {100 * same:.0f}%"
          f"; batched run equals single run: {batch_same}")
    if args.compile:
        print(f"compile_decode: first request (trace + inductor + C++ build) {warmup:.1f} s wall")
    c = args.concurrent
    for i, unit in ((1, "cpu"), (0, "wall")):
        ours_d, hf_d, batch_d = decode_rate("ours", i), decode_rate("hf", i), decode_rate("batch", i, c)
        ours_t, hf_t, batch_t = args.new / r["ours_n"][i], args.new / r["hf_n"][i], c * args.new / r["batch_n"][i]
        print(f"[{unit} time] decode tok/s: ours 1 stream {ours_d:7.1f} | HF 1 stream {hf_d:7.1f} | ours {c} "
              f"concurrent {batch_d:7.1f} -> {ours_d / hf_d:4.2f}x, {batch_d / hf_d:5.2f}x HF")
        print(f"[{unit} time] whole requests (prefill + decode) tok/s: ours 1 stream {ours_t:7.1f} | HF 1 stream "
              f"{hf_t:7.1f} | ours {c} concurrent {batch_t:7.1f} -> {ours_t / hf_t:4.2f}x, {batch_t / hf_t:5.2f}x HF")
    engine = LLMEngine(ours, config=ecfg)
    k2 = K2Config.from_preset("kimi-k2-instruct")
    lat, head = latent_bytes_per_token(k2, torch.bfloat16), per_head_bytes_per_token(k2, torch.bfloat16)
    print(f"cache bytes/token: engine pool {engine.pool.bytes_per_token} = formula "
          f"{latent_bytes_per_token(config, torch.float32)} ({args.preset}, fp32); kimi-k2-instruct bf16: latent "
          f"{lat} vs per-head {head} ({head / lat:.1f}x)")


if __name__ == "__main__":
    main()
