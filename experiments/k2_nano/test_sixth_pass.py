"""experiments/k2_nano/sixth_pass.toml (experiment 4, not shipped) continues the shipped chain of recipes/.

Opt-in: `pytest --run-experiments`."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sixth_pass_starts_from_the_fifth_with_its_tokenizer():
    fifth = tomllib.loads((ROOT / "recipes" / "k2-nano-instruct-stage5.toml").read_text())
    tried = Path(__file__).resolve().parent / "sixth_pass.toml"
    sixth = tomllib.loads(tried.read_text())
    # init_from and data paths are relative to the recipe's folder, out_dir to the repo root
    assert (tried.parent / sixth["model"]["init_from"]).resolve() == (ROOT / fifth["train"]["out_dir"] / "final"
                                                                      ).resolve()
    assert (tried.parent / sixth["data"]["tokenizer"]).resolve() == (ROOT / "recipes" / fifth["data"]["tokenizer"]
                                                                     ).resolve()
    assert "python -m experiments.k2_nano.synth --out runs/nano/sft9" in tried.read_text()
