import tomllib
from pathlib import Path

import pytest

from kimi_k2.train.recipe import Recipe, apply_override

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

MINIMAL = """
[model]
preset = "k2-tiny"
[data]
paths = ["tokens.npy"]
seq_len = 16
"""


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_minimal_recipe_defaults_and_relative_paths(tmp_path):
    r = Recipe.from_toml(write(tmp_path, MINIMAL))
    assert r.data.paths == [str(tmp_path / "tokens.npy")]
    assert r.optim.name == "muonclip" and r.schedule.kind == "wsd" and r.train.grad_accum == 1
    assert r.model.build_config().num_hidden_layers == 3


def test_overrides_parse_toml_values(tmp_path):
    r = Recipe.from_toml(write(tmp_path, MINIMAL), ["optim.lr=3e-3", "train.dtype=bfloat16",
                                                    "model.overrides={num_hidden_layers = 2}"])
    assert r.optim.lr == 3e-3 and r.train.dtype == "bfloat16"
    assert r.model.build_config().num_hidden_layers == 2
    with pytest.raises(ValueError, match="section.key=value"):
        apply_override({}, "lr=3")


@pytest.mark.parametrize(
    "extra, word",
    [
        ("[bogus]\nx = 1", "bogus"),
        ("[train]\nbatchsize = 2", "batchsize"),
        ("[optim]\nname = 'sgd'", "sgd"),
        ("[schedule]\nkind = 'cosine'\n[train]\ndtype = 'float16'", "float16"),
        ("[train]\nkeep_last = 0", "keep_last"),
        ("[parallel]\nep = 2", r"ep > 1 needs FSDP2 \(dp_shard > 1 or -1\)"),
        ("[parallel]\ndp_shard = 0", "dp_shard must be >= 1, or -1"),
        ("[parallel]\ndp_shard = 4\nparam_dtype = 'fp16'", "param_dtype 'fp16'"),
        ("[parallel]\ndp_shard = 4\n[train]\nexpert_parallel = true", "under FSDP2 set \\[parallel\\] ep"),
        ("[parallel]\ndp_shard = -1\n[train]\ndtype = 'bfloat16'", "set \\[parallel\\] param_dtype"),
        ("[parallel]\ntp = 2", "tp"),
        ("[parallel]\nactivation_checkpointing = true", "built for FSDP2"),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, extra, word):
    with pytest.raises(ValueError, match=word):
        Recipe.from_toml(write(tmp_path, MINIMAL + extra))


def test_model_source_must_be_unambiguous(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        Recipe.from_toml(write(tmp_path, MINIMAL.replace('preset = "k2-tiny"', "")))
    with pytest.raises(KeyError, match="k2-huge"):
        Recipe.from_toml(write(tmp_path, MINIMAL.replace("k2-tiny", "k2-huge")))


def test_sft_needs_a_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        Recipe.from_toml(write(tmp_path, MINIMAL + '\nkind = "sft"'))


def test_invalid_toml_is_reported(tmp_path):
    with pytest.raises(ValueError, match="not valid TOML"):
        Recipe.from_toml(write(tmp_path, "[model\n"))


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(path):
    init = tomllib.loads(path.read_text()).get("model", {}).get("init_from")
    if init and not (path.parent / init / "config.json").exists():
        # validation reads the config.json of the pretrained model, which another recipe makes
        with pytest.raises(FileNotFoundError, match="config.json"):
            Recipe.from_toml(path)
    else:
        Recipe.from_toml(path)


def test_parallel_section_defaults_to_data_parallel(tmp_path):
    r = Recipe.from_toml(write(tmp_path, MINIMAL))
    assert (r.parallel.dp_shard, r.parallel.ep, r.parallel.param_dtype) == (1, 1, "auto")
    r = Recipe.from_toml(write(tmp_path, MINIMAL + "[parallel]\ndp_shard = -1\nep = 4\nparam_dtype = 'bfloat16'"))
    assert r.to_dict()["parallel"] == {"dp_shard": -1, "ep": 4, "param_dtype": "bfloat16",
                                       "reshard_after_forward": True, "activation_checkpointing": False}
