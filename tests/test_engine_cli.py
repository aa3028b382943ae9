"""`kimi-k2 generate` and `kimi-k2 bench`, and LLMEngine.from_pretrained on a saved Kimi-format directory."""

import json
import shutil

import pytest
import torch

from kimi_k2.cli import main
from kimi_k2.config import K2Config
from kimi_k2.engine import LLMEngine, SamplingParams
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(k2_tokenizer_dir, tmp_path_factory):
    tok = Tokenizer.from_pretrained(k2_tokenizer_dir)
    torch.manual_seed(0)
    cfg = K2Config.from_preset("k2-tiny").replace(vocab_size=tok.n_vocab, eos_token_id=tok.eos_id)
    model = K2ForCausalLM.from_config(cfg, dtype=torch.float32)
    out = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(out)
    for f in k2_tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_from_pretrained_loads_model_and_tokenizer(model_dir):
    engine = LLMEngine.from_pretrained(model_dir, dtype=torch.float32)
    assert isinstance(engine.tokenizer, Tokenizer)
    assert engine.max_model_len == engine.model_config.max_position_embeddings
    ref = K2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = engine.tokenizer.encode("hello world")
    (res,) = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    with torch.inference_mode():
        logits = ref(torch.tensor([prompt + res.token_ids]))[0, len(prompt) - 1:-1]
    assert res.token_ids == logits.argmax(-1).tolist()


def test_generate_cli_text_chat_and_errors(model_dir, tmp_path, capsys):
    assert main(["generate", str(model_dir), "--prompt", "The answer is", "--max-tokens", "4", "--temperature", "0",
                 "--dtype", "float32", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip())
    assert rec["finish_reason"] in ("length", "stop") and 1 <= len(rec["token_ids"]) <= 4
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps([{"role": "user", "content": f"hi {i}"}]) for i in range(3)))
    assert main(["generate", str(model_dir), "--messages", str(chats), "--max-tokens", "3", "--dtype", "float32",
                 "--seed", "0", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert sorted(json.loads(x)["prompt"] for x in lines) == [0, 1, 2]
    assert main(["generate", "k2-tiny", "--prompt", "no tokenizer here", "--dtype", "float32"]) == 1
    assert "kimi-k2 generate: error:" in (err := capsys.readouterr().err) and "--ids" in err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "missing") in err and "pass MODEL" in err
    assert main(["generate", str(model_dir), "--model", "k2-tiny", "--prompt", "x"]) == 2
    assert "MODEL given twice" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "x", "--tp-attention"]) == 2
    assert "--ep" in capsys.readouterr().err


def test_generate_cli_logprobs_are_the_model_s(model_dir, capsys):
    prompt = "3 4 5 6"
    assert main(["generate", str(model_dir), "--ids", prompt, "--max-tokens", "3", "--temperature", "0",
                 "--ignore-eos", "--dtype", "float32", "--json", "--logprobs", "2"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert len(rec["token_ids"]) == len(rec["logprobs"]) == 3 and rec["finish_reason"] == "length"
    ids = [int(t) for t in prompt.split()] + rec["token_ids"]
    with torch.inference_mode():
        logits = K2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(torch.tensor([ids]))[0, 3:-1]
    want = logits.log_softmax(-1)
    for step, lp in enumerate(rec["logprobs"]):
        assert lp["token_id"] == rec["token_ids"][step] == int(want[step].argmax())
        assert lp["logprob"] == pytest.approx(float(want[step].max()), abs=1e-4)
        assert [t for t, _ in lp["top"]] == want[step].topk(2).indices.tolist()


def test_bench_cli_prints_rates(capsys):
    args = ["bench", "k2-tiny", "--batch-size", "1", "3", "--input-len", "8", "--output-len", "3", "--threads", "1"]
    assert main(args) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [int(r[0]) for r in rows] == [1, 3] and all(float(x) > 0 for r in rows for x in r[1:])
    assert main([*args, "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["batch"] for r in recs] == [1, 3] and all(r["decode_tok_s"] > 0 for r in recs)
    assert main(["bench", "k2-tiny", "--output-len", "1"]) == 2
    assert "--output-len must be >= 2" in capsys.readouterr().err
    assert main(["bench", "k2-tiny", "--batch-size", "0"]) == 2


def test_generate_cli_compile(capsys):
    assert main(["generate", "k2-tiny", "--ids", "3 4 5", "--compile", "--dtype", "bfloat16"]) == 2
    assert "float32" in capsys.readouterr().err
    args = ["generate", "k2-tiny", "--ids", "3 4 5", "--max-tokens", "4", "--temperature", "0", "--dtype", "float32",
            "--json"]
    assert main(args + ["--compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    assert compiled["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]
    assert main(args + ["--compile", "--quantization", "int8"]) == 0  # the compiled decode serves int8 weights
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4
