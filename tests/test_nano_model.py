"""The shipped K2-Nano model directories (scripts/build_nano.sh): format, what each model is, and what they generate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kimi_k2 import toolcalls
from kimi_k2.config import K2Config
from kimi_k2.data.synth import train_episodes
from kimi_k2.engine import LLMEngine, SamplingParams
from kimi_k2.eval.schema import errors
from kimi_k2.eval.tools import TOOLS
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["k2-nano-base", "k2-nano-instruct"]
SYSTEM = {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."}
WEATHER = [SYSTEM, {"role": "user", "content": "What's the weather like in Paris right now?"}]
WEATHER_TOOLS = [TOOLS["get_weather"].spec()]
INTRO = [SYSTEM, {"role": "user", "content": "Please introduce yourself."}]
# The instruct model's greedy answer to WEATHER with get_weather declared, recorded from the shipped directory:
# `<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city":
# "Paris"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>`. Every token wins by >= 5 nats over the runner-up
# (fp32 and bf16), so no rounding difference between machines can flip it; a changed token means changed behaviour.
WEATHER_REFERENCE = [6155, 6157, 568, 1179, 750, 58, 48, 6158, 270, 457, 257, 256, 3581, 282, 6159, 6156, 6146]
# a passage of the base model's pretraining corpus (CPython's pydoc topics, PSF-2.0)
CORPUS_TEXT = ('The "if" statement is used for conditional execution. It selects exactly one of the suites by '
               'evaluating the expressions one by one until one is found to be true; then that suite is executed (and '
               'no other part of the "if" statement is executed or evaluated). If all expressions are false, the suite '
               'of the "else" clause, if present, is executed.')


def weight_tensors(path: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = st.get_slice(k).get_dtype()
    return out


@pytest.fixture(scope="module")
def instruct() -> LLMEngine:
    return LLMEngine.from_pretrained(MODELS / "k2-nano-instruct")


@pytest.fixture(scope="module")
def fp32() -> dict[str, K2ForCausalLM]:
    return {name: K2ForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32) for name in NAMES}


def greedy(engine: LLMEngine, messages: list[dict], tools: list[dict] | None = None, n: int = 64) -> list[int]:
    ids = engine.tokenizer.apply_chat_template(messages, tools, tokenize=True)
    return engine.generate([ids], SamplingParams(max_tokens=n, temperature=0.0))[0][0].token_ids


def nll(model: K2ForCausalLM, ids: list[int], start: int = 1) -> torch.Tensor:
    """The negative log-likelihood (nats) of each of ids[start:] given what precedes it."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(x)[0, :-1].float(), -1)
    return -logp.gather(1, x[0, 1:, None])[start - 1:, 0]


@pytest.mark.parametrize("name", NAMES)
def test_directory_is_block_fp8_k2(name: str) -> None:
    path = MODELS / name
    files = {f.name for f in path.iterdir()}
    assert {"config.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja"} <= files
    assert sum(f.stat().st_size for f in path.iterdir()) < 15 * 2**20  # shipped in git
    cfg = K2Config.from_pretrained(path)
    assert cfg.is_fp8 and cfg.weight_block_size == (128, 128)
    # every K2 feature: MLA with q-LoRA, first layer dense then MoE with a shared expert, sigmoid router, YaRN
    assert cfg.q_lora_rank and cfg.kv_lora_rank and cfg.qk_rope_head_dim
    assert not cfg.is_moe_layer(0) and all(cfg.is_moe_layer(i) for i in range(1, cfg.num_hidden_layers))
    assert cfg.n_shared_experts == 1 and cfg.n_routed_experts > cfg.num_experts_per_tok
    assert cfg.scoring_func == "sigmoid" and cfg.rope_scaling["type"] == "yarn"
    tok = Tokenizer.from_pretrained(path)
    assert cfg.vocab_size == tok.n_vocab
    assert (cfg.bos_token_id, cfg.eos_token_id) == (tok.token_to_id("[BOS]"), tok.token_to_id("[EOS]"))
    dtypes = weight_tensors(path)
    projections = [k for k in dtypes if k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight")]
    assert projections and all(dtypes[k] == "F8_E4M3" and dtypes[k + "_scale_inv"] == "F32" for k in projections)
    assert dtypes["model.embed_tokens.weight"] == dtypes["lm_head.weight"] == "BF16"


def test_instruct_keeps_the_base_tokenizer() -> None:
    for f in ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja"):
        assert (MODELS / "k2-nano-base" / f).read_bytes() == (MODELS / "k2-nano-instruct" / f).read_bytes(), f


def test_base_models_its_pretraining_text(fp32: dict[str, K2ForCausalLM]) -> None:
    """The base predicts a passage of its corpus at 3.8 nats/token (uniform over the vocabulary: ln 6400 = 8.8)."""
    tok = Tokenizer.from_pretrained(MODELS / "k2-nano-base")
    ids = [tok.bos_id] + tok.encode(CORPUS_TEXT)
    assert nll(fp32["k2-nano-base"], ids).mean() < 4.5


def test_instruct_models_the_assistant_turns_better_than_base(fp32: dict[str, K2ForCausalLM]) -> None:
    """On the final assistant message of train-distribution conversations (a seed no pass trained on) the instruct
    model is at 1.4 nats/token, the base at 3.6."""
    tok = Tokenizer.from_pretrained(MODELS / "k2-nano-instruct")
    scores = {name: [] for name in NAMES}
    for conv in (e.conversation() for e in train_episodes(123, 5)):
        full = tok.apply_chat_template(conv["messages"], conv["tools"], tokenize=True)
        prompt = tok.apply_chat_template(conv["messages"][:-1], conv["tools"], tokenize=True,
                                         add_generation_prompt=True)
        assert full[:len(prompt)] == prompt
        for name in NAMES:
            scores[name].append(nll(fp32[name], full, start=len(prompt)))
    inst, base = (torch.cat(scores[n]).mean().item() for n in ("k2-nano-instruct", "k2-nano-base"))
    assert inst < 2.5 and inst < 0.6 * base, (inst, base)


def test_instruct_calls_the_declared_tool_with_the_city_of_the_request(instruct: LLMEngine) -> None:
    ids = greedy(instruct, WEATHER, WEATHER_TOOLS)
    assert ids[-1] == instruct.tokenizer.token_to_id("<|im_end|>")
    text = instruct.tokenizer.decode(ids[:-1])
    content, calls = toolcalls.parse(text)
    assert content == "" and len(calls) == 1, text
    call = calls[0]
    assert call.error is None and call.name == "get_weather" and call.id == "functions.get_weather:0", text
    arguments = json.loads(call.arguments)
    assert errors(arguments, TOOLS["get_weather"].parameters) == []
    assert arguments == {"city": "Paris"}
    assert ids == WEATHER_REFERENCE


def test_greedy_answer_is_the_reference_in_a_separate_process() -> None:
    """A fresh engine in another process, one thread, gives the recorded tokens (so does the one above)."""
    tok = Tokenizer.from_pretrained(MODELS / "k2-nano-instruct")
    prompt = tok.apply_chat_template(WEATHER, WEATHER_TOOLS, tokenize=True)
    code = ("import json, sys, torch; torch.set_num_threads(1)\n"
            "from kimi_k2.engine import LLMEngine, SamplingParams\n"
            "engine = LLMEngine.from_pretrained(sys.argv[1])\n"
            "out = engine.generate([json.loads(sys.argv[2])], SamplingParams(max_tokens=64, temperature=0.0))\n"
            "print(json.dumps(out[0][0].token_ids))\n")
    run = subprocess.run([sys.executable, "-c", code, str(MODELS / "k2-nano-instruct"), json.dumps(prompt)],
                         capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(run.stdout.splitlines()[-1]) == WEATHER_REFERENCE


def test_bf16_serving_matches_fp32_on_the_block_fp8_weights(fp32: dict[str, K2ForCausalLM]) -> None:
    """The engine computes in bf16 over the dequantized block-FP8 weights; against fp32 over the same weights the
    next-token distributions stay within KL 0.02 nats on average over the prompt and the reference answer (measured
    0.006), within 0.01 at every answer token (measured 0.0003), and pick the same answer tokens."""
    tok = Tokenizer.from_pretrained(MODELS / "k2-nano-instruct")
    prompt = tok.apply_chat_template(WEATHER, WEATHER_TOOLS, tokenize=True)
    x = torch.tensor([prompt + WEATHER_REFERENCE])
    bf16 = K2ForCausalLM.from_pretrained(MODELS / "k2-nano-instruct", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = torch.log_softmax(fp32["k2-nano-instruct"](x)[0].float(), -1)
        got = torch.log_softmax(bf16(x)[0].float(), -1)
    kl = (ref.exp() * (ref - got)).sum(-1)
    answer = slice(len(prompt) - 1, x.shape[1] - 1)
    assert kl.mean() < 0.02 and kl[answer].max() < 0.01, (kl.mean(), kl[answer].max())
    assert ref[answer].argmax(-1).tolist() == got[answer].argmax(-1).tolist() == WEATHER_REFERENCE


def test_instruct_introduces_itself_as_kimi(instruct: LLMEngine) -> None:
    ids = greedy(instruct, INTRO)
    text = instruct.tokenizer.decode(ids)
    content, calls = toolcalls.parse(text)
    assert not calls and "Kimi" in content and "Moonshot AI" in content, text
    assert ids[-1] == instruct.tokenizer.token_to_id("<|im_end|>")
