"""`kimi-k2 data synth` (kimi_k2/data/synth.py): the train mix, the held-out check, the files, and their exact bytes."""

import hashlib
import json
from pathlib import Path

import pytest

from kimi_k2.cli import main
from kimi_k2.data.heldout import check_heldout, footprint, leaked_words
from kimi_k2.data.invented import invented_episode
from kimi_k2.data.synth import train_episodes, write_synth
from kimi_k2.eval import scenarios

NANO = Path(__file__).resolve().parent.parent / "models" / "k2-nano-instruct"
# sha256 of train.jsonl + heldout.jsonl of `kimi-k2 data synth --n 200 FLAGS`, recorded with the generator that made
# the shipped models' data (data sets of every mode regenerate byte for byte, so a change that alters them fails here)
PINNED = {
    "--seed 0": "262cfc7a99afa8857086ba6591c16d60e764229e13c82177b0be11ae53ce8207",
    "--seed 3 --invented 0.5": "a39b920839581df3f426bd7a40071c16e04b477bc793cd7c4f2c05a069bfa371",
    "--seed 4 --invented 0.7 --vocab {NANO}": "aa59730ce8b0297d5b33f8cb7760c27cf0d69f868fa096c6d2ac360da16e8e78",
}


@pytest.mark.parametrize("flags", PINNED)
def test_synth_regenerates_the_pinned_bytes(flags, tmp_path):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "200", *flags.format(NANO=NANO).split()]) == 0
    digest = hashlib.sha256((tmp_path / "train.jsonl").read_bytes() + (tmp_path / "heldout.jsonl").read_bytes())
    assert digest.hexdigest() == PINNED[flags]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout.jsonl", "train.jsonl"]  # no temporary files


def test_cli_synth_writes_the_train_and_heldout_conversations(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "40", "--seed", "5", "--heldout-n", "7"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    assert rows == [e.conversation() for e in scenarios.episodes(5, "train", 40)]
    assert held == [e.conversation() for e in scenarios.episodes(5, "heldout", 7)]
    assert f"wrote 40 train and 7 held-out conversations to {tmp_path}" in capsys.readouterr().out


def test_invented_fraction_draws_per_index():
    """Episode i is invented or not by a draw of its own, and then exactly invented_episode(seed, i)."""
    mixed = list(train_episodes(3, 300, 0.4))
    plain = list(scenarios.episodes(3, "train", 300))
    kinds = [e.kind.startswith("broad") for e in mixed]
    assert 90 < sum(kinds) < 150
    for i, (e, is_invented) in enumerate(zip(mixed, kinds, strict=True)):
        want = invented_episode(3, i) if is_invented else plain[i]
        assert e.conversation() == want.conversation()
    assert [e.conversation() for e in train_episodes(3, 300, 0.0)] == [e.conversation() for e in plain]


def test_reference_train_episodes_keep_the_heldout_property():
    train = list(scenarios.episodes(11, "train", 1000))
    heldout = list(scenarios.episodes(11, "heldout", 400))
    check_heldout(train, heldout)
    for key in ("tools", "values", "templates", "messages"):  # each of the four is there to compare
        assert set().union(*(footprint(e)[key] for e in heldout)), key
    assert leaked_words(train, heldout) == []
    assert len(leaked_words(heldout, heldout)) > 30  # the words it looks for: cities, items, elements...


def test_a_leak_is_named_and_nothing_is_written(tmp_path):
    train = list(scenarios.episodes(11, "train", 200))
    leaked = scenarios.episode(11, "heldout", 5)  # a held-out episode in the train set
    with pytest.raises(ValueError, match="shares"):
        check_heldout(train + [leaked], list(scenarios.episodes(11, "heldout", 20)))
    with pytest.raises(ValueError, match="shares"):
        write_synth(tmp_path / "d", train + [leaked], 11, 20)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv,message", [
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--n", "10", "--heldout-n", "-1"], "--heldout-n must be >= 0, got -1"),
    (["--n", "10", "--invented", "1.5"], "--invented must be in [0, 1], got 1.5"),
    (["--n", "10", "--vocab", "{NANO}"], "--vocab shapes the invented conversations only"),
    (["--n", "10", "--invented", "0.5", "--vocab", "{tmp}/nope"], "no tiktoken.model in {tmp}/nope"),
])
def test_cli_synth_names_bad_input_and_writes_nothing(argv, message, tmp_path, capsys):
    argv = [a.format(NANO=NANO, tmp=tmp_path) for a in argv]
    assert main(["data", "synth", "--out", str(tmp_path / "d"), *argv]) == 1
    assert f"kimi-k2 data: error: {message.format(tmp=tmp_path)}" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_cli_synth_usage_errors_exit_2(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "ten"]) == 2
    assert "argument --n: invalid int value: 'ten'" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "10", "--broad", "0.5"]) == 2  # an experiments flag
    assert "unrecognized arguments: --broad 0.5" in capsys.readouterr().err
