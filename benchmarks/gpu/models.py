"""The benchmark models: one set of random weights in Hugging Face layout, run by transformers `generate()` and by the
kimi_k2 engine.

The engine rows run bf16 weights and the same weights quantized to block-FP8 kept resident (`FP8Linear`).

`k2-bench-4b` is the K2 shape (MLA with kv_lora_rank 512 + rope 64, 8-of-N sigmoid MoE with a shared expert, first
layer dense, the real 163,840 vocabulary) at 4.2 B parameters (1.3 B active): 4.9 GB in FP8, 8.4 GB in bf16.
"""

from __future__ import annotations

import time

import torch

from kimi_k2.config import K2Config

BENCH_MODELS = {
    "k2-bench-4b": K2Config.from_preset("kimi-k2-instruct").replace(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=12,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=768, n_routed_experts=64, num_experts_per_tok=8,
        quantization_config=None),
    "k2-tiny": K2Config.from_preset("k2-tiny"),  # the dry run
}


def random_hf_model(config: K2Config, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """transformers DeepseekV3ForCausalLM with random weights (std 1/sqrt(fan_in), as `kimi_k2.engine.bench`), built
    on `device`."""
    import transformers

    d = config.replace(quantization_config=None).to_dict()
    d["model_type"] = "deepseek_v3"
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM._from_config(transformers.DeepseekV3Config(**d), dtype=dtype)
    with torch.no_grad():
        for t in model.parameters():
            if t.ndim == 2:
                t.normal_(0.0, t.shape[1] ** -0.5)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate(model: torch.nn.Module, device: torch.device, prompt_len: int, new_tokens: int, batch: int = 1,
                seed: int = 0) -> dict[str, float]:
    """Greedy `generate()` with a timestamp as each new token's logits arrive: prefill = until the first, decode
    tokens/s from the other new_tokens - 1."""
    import transformers

    stamps: list[float] = []

    class Stamp(transformers.LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            _sync(device)
            stamps.append(time.perf_counter())
            return scores

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(seed)).to(device)

    def run(n: int) -> tuple[float, torch.Tensor]:
        stamps.clear()
        _sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, eos_token_id=None,
                                 logits_processor=transformers.LogitsProcessorList([Stamp()]))
        return t, out

    run(2)  # warm-up (kernels, caches)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, out = run(new_tokens)
    decode_s = max(stamps[-1] - stamps[0], 1e-9)
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": int(out.shape[1] - prompt_len),
            "prefill_s": stamps[0] - start, "decode_tok_s": batch * (len(stamps) - 1) / decode_s,
            "ms_per_token": 1e3 * decode_s / (len(stamps) - 1),
            "peak_memory_GB": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None}


def k2_model(hf_model: torch.nn.Module, config: K2Config, device: torch.device, dtype: torch.dtype,
             fp8: bool = False) -> torch.nn.Module:
    """The kimi_k2 model over the HF model's weights on `device`; fp8: its projections quantized to block-FP8 and kept
    FP8 (`FP8Linear`, as a block-FP8 checkpoint loads on CUDA)."""
    from kimi_k2.model import K2ForCausalLM
    from kimi_k2.ops.triton.fp8_module import quantize_to_fp8_resident

    with torch.device(device):
        model = K2ForCausalLM.from_config(config, dtype)
    model.load_state_dict(hf_model.state_dict())
    if fp8:
        quantize_to_fp8_resident(model)
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (FP8 weights and their scales included)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def engine_decode(model: torch.nn.Module, device: torch.device, batches: list[int], prompt_len: int,
                  new_tokens: int) -> list[dict[str, float]]:
    """The kimi_k2 engine on `device` (paged Triton MLA decode and CUDA graphs per batch bucket on CUDA):
    `kimi_k2.engine.bench.measure` per batch size (greedy, no EOS)."""
    from kimi_k2.engine.bench import measure
    from kimi_k2.engine.engine_config import EngineConfig
    from kimi_k2.engine.llm_engine import LLMEngine

    rows = []
    for b in batches:
        engine = LLMEngine(model, config=EngineConfig(max_num_seqs=b, max_num_batched_tokens=max(2048, b * prompt_len),
                                                      max_model_len=prompt_len + new_tokens,
                                                      num_pages=b * (-(-(prompt_len + new_tokens) // 16) + 1)))
        measure(engine, b, prompt_len, 2)  # warm-up: first-call costs (kernel compiles)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = measure(engine, b, prompt_len, new_tokens)
        row["ms_per_token"] = 1e3 * b / row["decode_tok_s"]
        row["peak_memory_GB"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        row["weights_GB"] = weight_bytes(model) / 1e9
        row["attention"], row["cuda_graphs"] = engine.pool.attention, engine.runner.graphs is not None
        rows.append(row)
        del engine
    return rows


def greedy_parity(hf_model: torch.nn.Module, models: dict[str, torch.nn.Module], device: torch.device,
                  prompt_len: int, new_tokens: int, seed: int = 1) -> list[dict[str, object]]:
    """Greedy tokens of HF `generate()` against each kimi_k2 engine on the same weights and prompt: the fraction of
    positions equal up to the first difference, and the max |logit| difference on the prompt's last position."""
    from kimi_k2.engine.engine_config import EngineConfig
    from kimi_k2.engine.llm_engine import LLMEngine
    from kimi_k2.engine.params import SamplingParams

    ids = torch.randint(0, hf_model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = hf_model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)[0, prompt_len:].tolist()
        ref_logits = hf_model(ids.to(device)).logits[0, -1].float()
    rows = []
    for name, model in models.items():
        engine = LLMEngine(model, config=EngineConfig(max_num_seqs=1, max_model_len=prompt_len + new_tokens))
        got = engine.generate([ids[0].tolist()], SamplingParams(max_tokens=new_tokens, temperature=0,
                                                                ignore_eos=True))[0][0].token_ids
        same = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want))
        with torch.inference_mode():
            logits = model(ids.to(device))[0, -1].float()
        rows.append({"engine": name, "tokens": len(want), "equal_prefix": same,
                     "max_logit_err": float((logits - ref_logits).abs().max()),
                     "logit_scale": float(ref_logits.abs().max())})
    return rows
