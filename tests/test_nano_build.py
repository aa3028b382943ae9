"""The K2-Nano build: recipes agree with the shipped directories, the build's data commands regenerate the shipped
models' data byte for byte, scripts/nano_text.py renders what the recipes read."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

from kimi_k2.config import K2Config
from kimi_k2.tokenizer import Tokenizer
from kimi_k2.train.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
# sha256 of train.jsonl + heldout.jsonl of each data command of scripts/build_nano.sh at --n 200 (`--vocab
# $W/tokenizer` there: the shipped tokenizer, models/k2-nano-instruct), recorded with the generator that made the data
# of the shipped models; the command prefix is build_nano.sh's NANO_SYNTH (experiments/k2_nano/synth.py)
BUILD_DATA = {
    "--seed 100 --generic 0.5": "38823b92fadc3656ac7734dd3f17772225f7b2c635c818c5369c48b9481d5c62",
    "--seed 0 --generic 0.5": "557c8e4494d6f363a10c18ab45c4651128350c43012163af5a70bc7c9be7ecc0",
    "--seed 7 --generic 0.5": "ce55eb389547efcaffe2bf55aa7435959845b1aa082b3a481ee044117c6b103d",
    "--seed 20 --generic 0.4 --status 0.25": "96c41673aa57106e32c828ef63f262fb8be5a891f3bc60d6a89be84897c6aeb9",
    "--seed 40 --broad 0.5 --generic 0.3 --status 0.25":
        "cca60d526dfba82cba53ae3794e4e84a20dae13b4ae0a9ec87dab2f0e572d152",
    "--seed 50 --broad 0.6 --generic 0.25 --status 0.3 --vocab $W/tokenizer":
        "0b2b6a128073ac1c5dee99a6cf31e61d17ce6593a2f7fbb6c3a8f70846111bec",
    "--seed 70 --broad 0.5 --generic 0.15 --status 0.6 --vocab $W/tokenizer":
        "a4db00a44e5b21ee1173eccbb515c0f8420fff2a5ad476915440c839aba0531e",
}
SHARDS = ("--seed 0 --generic 0.5", "--seed 7 --generic 0.5")  # two of the eight of build_nano.sh's synth()
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


def test_build_data_commands_regenerate_the_shipped_data(tmp_path: Path) -> None:
    script = (ROOT / "scripts" / "build_nano.sh").read_text()
    assert 'NANO_SYNTH=("$PY" -m experiments.k2_nano.synth)' in script
    # the sharded first SFT set: seeds 0..7, --generic 0.5
    assert 'synth "$W/sft" 20000 0 0.5' in script and "--seed $(( $3 + k )) --generic \"$4\"" in script
    for flags, digest in BUILD_DATA.items():
        if flags not in SHARDS:
            assert flags.replace("$W/tokenizer", '"$W/tokenizer"') in script, flags
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        argv = shlex.split(flags.replace("$W/tokenizer", str(ROOT / "models" / "k2-nano-instruct")))
        subprocess.run([sys.executable, "-m", "experiments.k2_nano.synth", "--out", str(out), "--n", "200", *argv],
                       cwd=ROOT, check=True, capture_output=True)
        got = hashlib.sha256((out / "train.jsonl").read_bytes() + (out / "heldout.jsonl").read_bytes()).hexdigest()
        assert got == digest, f"build_nano.sh's `{flags}` data changed"


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
