"""benchmarks/cpu_peers: the GGUF writer (read back with `gguf`), the byte-level vocabulary, the HF tokenizer.json and
the benchmark worker protocol. No peer (llama.cpp, vLLM) is needed."""

import base64
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.engine.loader import load_model
from kimi_k2.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "cpu_peers"
NANO = REPO / "models" / "k2-nano-instruct"
sys.path.insert(0, str(BENCH))

gguf = pytest.importorskip("gguf", reason="the `gguf` package (project `test` extra) is not installed")
import gguf_writer  # noqa: E402
import vocab  # noqa: E402

N_BASE = 300  # the first 300 ranks of the k2-nano vocabulary: 256 bytes + 44 merges, a valid BPE on its own


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory) -> Path:
    """A K2-shaped checkpoint (k2-tiny widths, 2 of 3 layers MoE) with a 300 + 256-id tokenizer, vocab 600."""
    d = tmp_path_factory.mktemp("ckpt")
    lines = [line for line in (NANO / "tiktoken.model").read_bytes().splitlines() if line.strip()]
    kept = [line for line in lines if int(line.split()[1]) < N_BASE]
    (d / "tiktoken.model").write_bytes(b"\n".join(kept) + b"\n")
    nano = json.loads((NANO / "tokenizer_config.json").read_text())["added_tokens_decoder"]  # ids 6144.. -> 300..
    specials = {str(int(i) - 6144 + N_BASE): entry for i, entry in nano.items()}
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": specials}))
    config = K2Config.from_preset("k2-tiny").replace(vocab_size=600, bos_token_id=N_BASE, eos_token_id=N_BASE + 1)
    torch.manual_seed(0)
    from kimi_k2.model import K2ForCausalLM

    model = K2ForCausalLM.from_config(config, torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(d)
    return d


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def test_f32_gguf_metadata_tensors_and_values(small_ckpt, tmp_path):
    out = gguf_writer.write_gguf(small_ckpt, tmp_path / "m.gguf", "f32")
    assert not list(tmp_path.glob("*.partial"))
    r = gguf.GGUFReader(out)
    f = _fields(r)
    c = K2Config.from_pretrained(small_ckpt)
    a = "deepseek2"
    assert f["general.architecture"] == a
    assert f[f"{a}.block_count"] == c.num_hidden_layers and f[f"{a}.embedding_length"] == c.hidden_size
    assert f[f"{a}.attention.head_count_kv"] == 1  # MLA as MQA over the latent
    assert f[f"{a}.attention.kv_lora_rank"] == c.kv_lora_rank and f[f"{a}.attention.q_lora_rank"] == c.q_lora_rank
    assert f[f"{a}.attention.key_length"] == c.kv_lora_rank + c.qk_rope_head_dim
    assert f[f"{a}.attention.key_length_mla"] == c.qk_head_dim and f[f"{a}.attention.value_length_mla"] == c.v_head_dim
    assert f[f"{a}.expert_count"] == c.n_routed_experts and f[f"{a}.expert_used_count"] == c.num_experts_per_tok
    assert f[f"{a}.leading_dense_block_count"] == c.first_k_dense_replace
    assert f[f"{a}.expert_gating_func"] == int(gguf.ExpertGatingFuncType.SIGMOID)
    assert f[f"{a}.expert_weights_scale"] == pytest.approx(c.routed_scaling_factor)
    assert f[f"{a}.expert_weights_norm"] is True
    assert f[f"{a}.rope.scaling.type"] == "yarn" and f[f"{a}.rope.scaling.factor"] == c.rope_scaling["factor"]
    assert f[f"{a}.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1 * c.rope_scaling["mscale_all_dim"])
    assert f[f"{a}.rope.dimension_count"] == c.qk_rope_head_dim

    # vocabulary: byte-level BPE, specials CONTROL, padding UNUSED, merges = base tokens - 256 bytes
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "kimi-k2"
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == c.vocab_size
    assert len(f["tokenizer.ggml.merges"]) == N_BASE - 256
    assert tokens[N_BASE] == "[BOS]" and types[N_BASE] == gguf.TokenType.CONTROL
    assert types[N_BASE + 255] == gguf.TokenType.CONTROL and types[N_BASE + 256] == gguf.TokenType.UNUSED
    assert types[0] == gguf.TokenType.NORMAL and tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ"
    assert f["tokenizer.ggml.bos_token_id"] == N_BASE and f["tokenizer.ggml.eos_token_id"] == N_BASE + 1

    # tensors: llama.cpp's names, every one f32, values equal to the checkpoint's
    t = {x.name: x for x in r.tensors}
    sd = load_model(str(small_ckpt), torch.float32).state_dict()
    moe = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    want = {"token_embd.weight", "output_norm.weight", "output.weight"}
    for i in range(c.num_hidden_layers):
        want |= {f"blk.{i}.{n}.weight" for n in ("attn_norm", "ffn_norm", "attn_q_a", "attn_q_a_norm", "attn_q_b",
                                                  "attn_kv_a_mqa", "attn_kv_a_norm", "attn_k_b", "attn_v_b",
                                                  "attn_output")}
        want |= {f"blk.{i}.{n}.weight" for n in (
            ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp",
             "ffn_down_shexp") if i in moe else ("ffn_gate", "ffn_up", "ffn_down"))}
        want |= {f"blk.{i}.exp_probs_b.bias"} if i in moe else set()
    assert set(t) == want
    assert all(x.tensor_type == gguf.GGMLQuantizationType.F32 for x in t.values())

    def arr(name):  # numpy in PyTorch's dim order (GGUFReader gives the data in row-major numpy order)
        return np.asarray(t[name].data)

    np.testing.assert_array_equal(arr("token_embd.weight"), sd["model.embed_tokens.weight"].numpy())
    i = moe[0]
    p = f"model.layers.{i}."
    np.testing.assert_array_equal(arr(f"blk.{i}.exp_probs_b.bias"), sd[p + "mlp.gate.e_score_correction_bias"])
    for e in range(c.n_routed_experts):
        expert = sd[p + f"mlp.experts.{e}.down_proj.weight"]
        np.testing.assert_array_equal(arr(f"blk.{i}.ffn_down_exps.weight")[e], expert)
    # k_b (per head, transposed) and v_b put back together give kv_b_proj
    h, nope, v, r_kv = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    k_b, v_b = arr(f"blk.{i}.attn_k_b.weight"), arr(f"blk.{i}.attn_v_b.weight")
    assert k_b.shape == (h, r_kv, nope) and v_b.shape == (h, v, r_kv)
    kv_b = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(h * (nope + v), r_kv)
    np.testing.assert_array_equal(kv_b, sd[p + "self_attn.kv_b_proj.weight"].numpy())
    # ggml's dims are PyTorch's reversed: the loader wants k_b as {nope, kv_lora_rank, n_head}
    assert [int(n) for n in t[f"blk.{i}.attn_k_b.weight"].shape] == [nope, r_kv, h]


@pytest.mark.parametrize("kind, qtype, tol", [("f16", "F16", 1e-3), ("q8_0", "Q8_0", 2e-2)])
def test_16_bit_and_q8_0_types_and_values(small_ckpt, tmp_path, kind, qtype, tol):
    r = gguf.GGUFReader(gguf_writer.write_gguf(small_ckpt, tmp_path / f"m-{kind}.gguf", kind))
    t = {x.name: x for x in r.tensors}
    Q = gguf.GGMLQuantizationType
    assert t["blk.1.ffn_gate_exps.weight"].tensor_type == Q[qtype]
    assert t["output.weight"].tensor_type == Q[qtype]
    for name in ("blk.1.ffn_gate_inp.weight", "blk.1.attn_norm.weight", "blk.1.exp_probs_b.bias"):
        assert t[name].tensor_type == Q.F32  # router, norms and biases stay f32 as in llama.cpp's converter
    x = t["blk.0.attn_q_b.weight"]
    got = gguf.quants.dequantize(x.data, x.tensor_type).reshape(96, 32)
    want = load_model(str(small_ckpt), torch.float32).state_dict()["model.layers.0.self_attn.q_b_proj.weight"]
    assert np.abs(got - want.numpy()).max() <= tol * np.abs(want.numpy()).max()


def test_vocab_merges_rebuild_every_token():
    ranks = Tokenizer.from_pretrained(NANO).model._mergeable_ranks
    v = vocab.byte_level_vocab(NANO, 6400)
    u2b = {c: b for b, c in vocab.bytes_to_unicode().items()}
    merge_rank = {m: i for i, m in enumerate(v.merges)}
    assert len(v.merges) == len(ranks) - 256
    for token, rank in list(ranks.items())[::97]:  # BPE with the merge list alone reproduces each token whole
        parts = [vocab.token_string(bytes([b])) for b in token]
        while len(parts) > 1:
            pairs = [(merge_rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        assert parts == [v.tokens[rank]] and bytes(u2b[ch] for ch in parts[0]) == token


def test_hf_tokenizer_json_gives_our_ids():
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_str(vocab.hf_tokenizer_json(NANO, 6400))
    ours = Tokenizer.from_pretrained(NANO)
    for text in ["Hello world! The quick brown fox, 12345 jumps.", "中文测试 and  spaces\n\n  tabs\t", "It's we'LL",
                 "x<|im_end|>y [BOS]"]:
        ids = ours.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids
        assert hf.decode(ids, skip_special_tokens=False) == text


def test_bad_input_names_the_problem(small_ckpt, tmp_path):
    with pytest.raises(ValueError, match="vocab_size is 600"):
        gguf_writer.write_gguf(small_ckpt, tmp_path / "x.gguf", "f32", tokenizer=NANO)
    with pytest.raises(ValueError, match="unknown GGUF type"):
        gguf_writer.write_gguf(small_ckpt, tmp_path / "x.gguf", "q4_k")
    assert not list(tmp_path.iterdir())  # nothing half-written
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tiktoken.model").write_bytes(base64.b64encode(b"ab") + b" 0\n")
    with pytest.raises(ValueError, match="not the merge of two lower-ranked tokens"):
        vocab.byte_level_vocab(bad, 600)


def test_worker_protocol_greedy_tokens_and_logits(tmp_path):
    """The benchmark's kimi worker answers with the engine's greedy tokens, the model's logits and its peak RSS."""
    cmd = [sys.executable, str(BENCH / "worker.py"), "kimi", "--model", "k2-tiny", "--threads", "1",
           "--mode", '{"dtype": "float32"}', "--max-seqs", "2", "--max-len", "32"]
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    out = tmp_path / "logits.npy"
    reqs = [{"op": "generate", "prompts": prompts, "new": 5},
            {"op": "logits", "ids": [5, 6, 7, 8, 1, 2], "start": 4, "out": str(out)},
            {"op": "stats"}, {"op": "nope"}, {"op": "quit"}]
    p = subprocess.run(cmd, input="".join(json.dumps(r) + "\n" for r in reqs), capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0, p.stderr
    ready, gen, logits, stats, unknown = (json.loads(line) for line in p.stdout.splitlines())
    assert ready == {"ready": True}
    model = load_model("k2-tiny", torch.float32)
    with torch.no_grad():
        for prompt, got in zip(prompts, gen["tokens"], strict=True):
            ids = list(prompt)
            for _ in range(5):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            assert got == ids[len(prompt):]
        want = model(torch.tensor([[5, 6, 7, 8, 1, 2]]))[0, 3:5].numpy()
    assert gen["cpu"] > 0 and gen["wall"] > 0
    np.testing.assert_allclose(np.load(logits["out"]), want, rtol=0, atol=1e-5)
    assert stats["peak_rss_mib"] > 50
    assert "unknown op" in unknown["error"]


def test_rates_are_medians_of_interleaved_rounds():
    import argparse

    import run

    w = run.Worker("x", "fp32", [], {})
    # (cpu s, wall s) per round: prefill (1 new token) then decode (N = 9 new tokens), and 4 streams
    w.samples = {"prefill": [(0.10, 0.2), (0.20, 0.4), (0.10, 0.3)], "decode": [(0.90, 1.0), (1.00, 1.2), (5.0, 9.0)],
                 "s4": [(2.0, 4.0), (3.0, 5.0), (1.0, 6.0)]}
    r = run.rates(w, argparse.Namespace(prompt=64, new=9), [1, 4])
    assert r["prefill"] == pytest.approx([64 / 0.10, 64 / 0.3])
    assert r["decode"][0] == pytest.approx(8 / 0.8)  # per round 8/0.8, 8/0.8, 8/4.9: the median
    assert r["s4"] == pytest.approx([4 * 9 / 2.0, 4 * 9 / 5.0])
    w.error = "boom"
    assert run.rates(w, argparse.Namespace(prompt=64, new=9), [1]) == {"error": "boom"}


def test_server_cpu_time_covers_the_process_tree():
    import http_bench

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "done\n"
        me = __import__("os").getpid()
        assert child.pid in http_bench.tree(me)
        assert http_bench.cpu_seconds(me) - http_bench.cpu_seconds(child.pid) >= 0
        assert http_bench.cpu_seconds(child.pid) >= 0.25
        assert http_bench.peak_rss_mib(child.pid) > 1
    finally:
        child.kill()
        child.wait()
