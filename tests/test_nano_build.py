"""The K2-Nano build: recipes agree with the shipped directories; scripts/nano_text.py renders what the recipes read."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from kimi_k2.config import K2Config
from kimi_k2.tokenizer import Tokenizer
from kimi_k2.train.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["k2-nano-base.toml", "k2-nano-instruct.toml", "k2-nano-instruct-stage2.toml",
           "k2-nano-instruct-stage3.toml", "k2-nano-instruct-stage4.toml", "k2-nano-instruct-stage5.toml"]


def test_base_recipe_builds_the_shipped_config() -> None:
    built = Recipe.from_toml(ROOT / "recipes" / "k2-nano-base.toml").model.build_config().to_dict()
    for name in ("k2-nano-base", "k2-nano-instruct"):
        shipped = K2Config.from_pretrained(ROOT / "models" / name).to_dict()
        for key in ("quantization_config", "torch_dtype"):  # set by the FP8 export
            shipped.pop(key), built.pop(key, None)
        assert shipped == built, name


def test_recipes_chain_base_to_instruct() -> None:
    # read as TOML: the SFT recipes' init_from (the base's export) exists only after the base run, which a fresh clone
    # has not done; the base recipe (a preset) validates fully
    base = Recipe.from_toml(ROOT / "recipes" / RECIPES[0])
    raw = [tomllib.loads((ROOT / "recipes" / r).read_text()) for r in RECIPES]
    assert base.data.kind == "pretrain" and raw[1]["data"]["kind"] == "sft"
    assert all(r["optim"]["name"] == "muonclip" for r in raw)
    for prev, nxt in zip(raw, raw[1:], strict=False):  # init_from is relative to recipes/, out_dir to the repo root
        assert (ROOT / "recipes" / nxt["model"]["init_from"]).resolve() == (ROOT / prev["train"]["out_dir"] / "final"
                                                                             ).resolve()
    assert all(not p.endswith("heldout.jsonl") for r in raw[1:] for p in r["data"]["paths"])
    # the sixth pass tried in experiment 4 starts from the fifth (shipped) one; its paths are relative to its own folder
    tried = ROOT / "experiments" / "k2_nano" / "sixth_pass.toml"
    sixth = tomllib.loads(tried.read_text())
    assert (tried.parent / sixth["model"]["init_from"]).resolve() == (ROOT / raw[-1]["train"]["out_dir"] / "final"
                                                                      ).resolve()
    assert (tried.parent / sixth["data"]["tokenizer"]).resolve() == (ROOT / "recipes" / raw[-1]["data"]["tokenizer"]
                                                                     ).resolve()


def test_nano_text_renders_chats_for_tokenizer_and_pretraining(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "Return the sum of a and b."}) + "\n")
    chat = {"messages": [{"role": "user", "content": "weather in Oslo?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"id": "functions.get_weather:0", "type": "function",
                              "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]}]}
    chats = tmp_path / "train.jsonl"
    chats.write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    out = tmp_path / "text"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "nano_text.py"), "--corpus", str(corpus), "--chats",
                    str(chats), "--n-chats", "1", "--out", str(out)], check=True, capture_output=True)
    rendered = [json.loads(line)["text"] for line in (out / "pretrain" / "chat.jsonl").read_text().splitlines()]
    assert len(rendered) == 1  # --n-chats 1
    tok = Tokenizer({bytes([b]): b for b in range(256)})
    assert rendered[0] == tok.apply_chat_template(chat["messages"], add_generation_prompt=False)
    assert "<|tool_call_begin|>functions.get_weather:0" in rendered[0]
    plain = (out / "tokenizer" / "chat.txt").read_text()
    assert "get_weather" in plain and "Oslo" in plain and "<|" not in plain
    assert (out / "tokenizer" / "corpus.txt").read_text() == "Return the sum of a and b."
    docs = [json.loads(line)["text"] for line in (out / "pretrain" / "corpus.jsonl").read_text().splitlines()]
    assert docs == ["Return the sum of a and b."]
