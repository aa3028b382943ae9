"""The shipped K2-Nano model directories (scripts/build_nano.sh): format, config, tokenizer and what they generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kimi_k2 import toolcalls
from kimi_k2.config import K2Config
from kimi_k2.data.tools import TOOLS
from kimi_k2.engine import LLMEngine, SamplingParams
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parent.parent / "models"
NAMES = ["k2-nano-base", "k2-nano-instruct"]
SYSTEM = {"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."}
WEATHER = [SYSTEM, {"role": "user", "content": "What's the weather like in Paris right now?"}]
INTRO = [SYSTEM, {"role": "user", "content": "Please introduce yourself."}]


def weight_tensors(path: Path) -> dict[str, torch.dtype]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = st.get_slice(k).get_dtype()
    return out


@pytest.fixture(scope="module")
def engines() -> dict[str, LLMEngine]:
    return {name: LLMEngine.from_pretrained(MODELS / name) for name in NAMES}


def greedy(engine: LLMEngine, messages: list[dict], tools: list[dict] | None = None, n: int = 64) -> list[int]:
    ids = engine.tokenizer.apply_chat_template(messages, tools, tokenize=True)
    return engine.generate([ids], SamplingParams(max_tokens=n, temperature=0.0))[0][0].token_ids


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


@pytest.mark.parametrize("name", NAMES)
def test_loads_with_from_pretrained(name: str) -> None:
    model = K2ForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(MODELS / name)
    ids = torch.tensor([tok.encode("def add(a, b):\n    return a + b\n")])
    logits = model(ids)
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()


def test_instruct_is_finetuned_from_base() -> None:
    def load(name: str) -> dict[str, torch.Tensor]:
        return K2ForCausalLM.from_pretrained(MODELS / name, dtype=torch.float32).state_dict()

    base, inst = load("k2-nano-base"), load("k2-nano-instruct")
    assert base.keys() == inst.keys()
    assert any(not torch.equal(base[k], inst[k]) for k in base)


def test_greedy_generation_is_deterministic(engines: dict[str, LLMEngine]) -> None:
    for engine in engines.values():
        tools = [TOOLS["get_weather"].spec()]
        a, b = greedy(engine, WEATHER, tools), greedy(engine, WEATHER, tools)
        assert a == b and len(a) >= 1
        assert all(0 <= t < engine.model_config.vocab_size for t in a)


def test_instruct_calls_get_weather(engines: dict[str, LLMEngine]) -> None:
    engine = engines["k2-nano-instruct"]
    ids = greedy(engine, WEATHER, [TOOLS["get_weather"].spec()])
    text = engine.tokenizer.decode(ids)
    _, calls = toolcalls.parse(text)
    assert len(calls) == 1, text
    call = calls[0]
    assert call.error is None and call.name == "get_weather", text
    assert call.id == "functions.get_weather:0"
    # the city is not asserted: the shipped nano model often names another city from its training data
    assert isinstance(json.loads(call.arguments)["city"], str)
    assert ids[-1] == engine.tokenizer.token_to_id("<|im_end|>")


def test_instruct_introduces_itself_as_kimi(engines: dict[str, LLMEngine]) -> None:
    engine = engines["k2-nano-instruct"]
    ids = greedy(engine, INTRO)
    text = engine.tokenizer.decode(ids)
    content, calls = toolcalls.parse(text)
    assert not calls and "Kimi" in content and "Moonshot AI" in content, text
    assert ids[-1] == engine.tokenizer.token_to_id("<|im_end|>")
