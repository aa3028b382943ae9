"""Every command line the README shows, read from README.md itself: run for real with small inputs where that is
quick, parsed (and `--help`) where a run would be long (a server, torchrun, make); plus the CLI's conventions.

A README line is `kimi-k2 ...`, `torchrun ...`, `make ...` or `python ...` in a fenced block (a trailing `# comment`
is dropped; `[...]` marks optional flags: parsed, left out of the run). Placeholders: DIR a Kimi-format model
directory, SRC a checkpoint, DST a new directory, FILE a text file, KEY an API key, NAME a served model name;
http://127.0.0.1:8000 is a loopback server over DIR. `QUICK` says how a command is made small; a command in
neither QUICK nor PARSE_ONLY fails the test until someone says how to test it.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from argparse import ArgumentParser, Namespace, _SubParsersAction
from pathlib import Path

import pytest
import torch
from server_fixtures import ServerThread, make_model_dir
from torch.distributed.run import get_args_parser as torchrun_parser

from kimi_k2.cli import COMMANDS, command_parser, main, parse
from kimi_k2.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from kimi_k2.model import K2ForCausalLM
from kimi_k2.server.state import ServerState
from kimi_k2.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
URL = "http://127.0.0.1:8000"

# command (with its subcommand) -> (flags set to these values, or added; extra arguments): small inputs, same code
QUICK: dict[str, tuple[dict[str, list[str]], list[str]]] = {
    "info": ({}, []),
    "plan": ({}, []),
    "convert": ({}, ["--no-progress"]),
    "data corpus": ({"--sources": ["pydoc"]}, []),
    "data synth": ({"--n": ["12"]}, []),
    "data tasks": ({}, []),
    "tokenizer train": ({"--vocab-size": ["600"]}, []),
    "train": ({}, [f"--set={kv}" for kv in ("schedule.total_steps=2", "schedule.warmup_steps=1", "data.seq_len=32",
                                              "train.micro_batch=2", "train.grad_accum=1", "train.log_every=1",
                                              "train.eval_every=2", "train.ckpt_every=2")]),
    "plot": ({}, []),
    "generate": ({"--max-tokens": ["4"]}, []),
    "bench": ({"--batch-size": ["1", "2"], "--input-len": ["8"], "--output-len": ["3"]}, []),
    "chat": ({"--max-tokens": ["4"]}, []),
    "eval": ({"-k": ["1"], "--max-tokens": ["8"], "--max-steps": ["2"]}, ["--limit", "1", "--out", "eval_results"]),
}
# a random-weight preset as MODEL -> the smallest one: the same code, and the compiled graphs test_engine_cli uses
SMALLER_PRESET = {"k2-small": "k2-tiny"}
PARSE_ONLY = {"serve"}  # runs until stopped: tests/test_server_errors.py runs it as a process


def _fenced_lines(text: str) -> tuple[list[str], str]:
    """(command lines of the fenced blocks, the text outside them)."""
    commands, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced and line.split(" ", 1)[0] in ("kimi-k2", "torchrun", "make", "python"):
            commands.append(line)
        elif not fenced:
            prose.append(line)
    return commands, "\n".join(prose)


README_LINES, README_PROSE = _fenced_lines(README.read_text())
INLINE = re.findall(r"`(kimi-k2 [^`]+)`", README_PROSE)


def _optional(tokens: list[str]) -> tuple[list[str], list[str]]:
    """['a', '[--b', 'c]', '[--d]'] -> (every token, brackets dropped; the tokens outside brackets)."""
    full, required, depth = [], [], 0
    for t in tokens:
        depth += t.count("[") if t.startswith("[") else 0
        full.append(t.strip("[]") if t.startswith("[") or t.endswith("]") else t)
        if depth == 0:
            required.append(t)
        depth -= t.count("]") if t.endswith("]") else 0
    return full, required


def _set(args: list[str], flag: str, values: list[str]) -> list[str]:
    """`flag`'s values in args replaced by `values` (or flag + values appended)."""
    if flag not in args:
        return [*args, flag, *values]
    i = args.index(flag) + 1
    j = i
    while j < len(args) and not args[j].startswith("-"):
        j += 1
    return args[:i] + values + args[j:]


def _key(args: list[str]) -> str:
    """'data synth', 'tokenizer train', or the command."""
    return " ".join(args[:2]) if args[0] in ("data", "tokenizer") else args[0]


def _subparser(parser: ArgumentParser, name: str) -> ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, _SubParsersAction):
            return action.choices.get(name)
    return None


@pytest.fixture(scope="module")
def workspace(k2_tokenizer_dir, tmp_path_factory):
    """The working directory of the README commands: recipes/, the placeholders' files, a loopback server."""
    ws = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "recipes", ws / "recipes")
    model = make_model_dir(k2_tokenizer_dir, ws / "model")
    (ws / "corpus.txt").write_text("Kimi K2 is a mixture-of-experts language model with 1T parameters.\n" * 50)
    names = {t[t.index("--model") + 1] for line in README_LINES if URL in line and "--model" in (t := line.split())}
    engine = LLMEngine(K2ForCausalLM.from_pretrained(model, dtype=torch.float32), Tokenizer.from_pretrained(model),
                       EngineConfig(memory_budget_bytes=1 << 25))
    state = ServerState(AsyncLLMEngine(engine), engine.tokenizer, sorted(names) or ["kimi-k2-test"],
                        engine.model_config.vocab_size, None, 16)
    with ServerThread(state) as url:
        subs = {"DIR": str(model), "SRC": str(model), "DST": str(ws / "dst"), "FILE": str(ws / "corpus.txt"),
                "KEY": "test-key", "NAME": "test-model"}
        yield ws, subs, url


def _substitute(tokens: list[str], subs: dict[str, str], url: str) -> list[str]:
    return [subs.get(t, t.replace(URL, url)) for t in tokens]


def _outputs_exist(args: list[str], ws: Path, out: str) -> None:
    """What each command leaves behind, beyond its exit status."""
    key = _key(args)
    if key == "convert":
        assert (Path(args[2]) / "config.json").is_file() and list(Path(args[2]).glob("*.safetensors"))
    elif key == "data corpus":
        assert all(json.loads(x)["text"] for x in Path(args[args.index("--out") + 1]).read_text().splitlines())
    elif key == "data synth":
        lines = (Path(args[args.index("--out") + 1]) / "train.jsonl").read_text().splitlines()
        assert len(lines) == int(args[args.index("--n") + 1])
    elif key == "data tasks":
        assert sorted(p.name for p in Path(args[args.index("--out") + 1]).glob("*.jsonl"))
    elif key == "tokenizer train":
        assert Tokenizer.from_pretrained(args[args.index("--out") + 1]).n_vocab > 256
    elif key == "train":
        pass  # checked by the plot that follows it in the README, and by its printed summary
    elif key == "plot":
        assert list((Path(args[1]) / "plots").glob("*.png"))
    else:
        assert out.strip(), f"`kimi-k2 {key}` printed nothing"


def _parses(argv: list[str]) -> tuple[ArgumentParser, Namespace]:
    try:
        return parse(argv)
    except SystemExit as e:  # argparse has printed why
        pytest.fail(f"`kimi-k2 {shlex.join(argv)}` does not parse (exit status {e.code})")


@pytest.mark.parametrize("line", README_LINES, ids=[" ".join(shlex.split(x, comments=True))[:50] for x in README_LINES])
def test_readme_command(line, workspace, monkeypatch, capsys):
    """One README line. The lines run in README order in one working directory, as a user runs them (the corpus
    before the tokenizer, training before its plot)."""
    ws, subs, url = workspace
    monkeypatch.chdir(ws)
    full, required = (_substitute(t, subs, url) for t in _optional(shlex.split(line, comments=True)))
    if full[0] == "make":
        if shutil.which("make") is None:
            pytest.skip("no make here")
        dry = subprocess.run(["make", "-n", *full[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        for cmd in dry.stdout.splitlines():  # what `make` would run: every kimi-k2 line parses
            words = shlex.split(cmd)
            if words and words[0].endswith("/kimi-k2"):
                _parses(words[1:])
        return
    if full[0] == "torchrun":
        launch = torchrun_parser().parse_args(full[1:])
        assert launch.module and launch.training_script == "kimi_k2.cli", "run the CLI as torchrun ... -m kimi_k2.cli"
        _, args = _parses(launch.training_script_args)
        assert getattr(args, "ep", None) in (None, int(launch.nproc_per_node)), "--ep N needs N torchrun processes"
        assert main([args.command, "--help"]) == 0
        return
    if full[0] == "python":
        script = full[1:3] if full[1] == "-m" else full[1:2]
        assert subprocess.run([sys.executable, *script, "--help"], cwd=ROOT, capture_output=True).returncode == 0
        return
    _parses(full[1:])  # every flag of the line, optional ones included, is the command's
    args = required[1:]
    key = _key(args)
    if key in PARSE_ONLY:
        assert main([args[0], "--help"]) == 0
        return
    assert key in QUICK, f"README shows `kimi-k2 {key}`: add how to run it small to QUICK (or PARSE_ONLY)"
    values, extra = QUICK[key]
    args = [SMALLER_PRESET.get(a, a) for a in args]
    for flag, v in values.items():
        args = _set(args, flag, v)
    args += extra
    capsys.readouterr()
    if key == "train":  # a process of its own: the trainer sets torch's global threads and determinism
        proc = subprocess.run([sys.executable, "-m", "kimi_k2.cli", *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.splitlines()[-1])["step"] == 2
        return
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))  # chat: one message, then EOF
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    _outputs_exist(args, ws, capsys.readouterr().out)


def test_readme_shows_every_command():
    shown = {_key(shlex.split(line, comments=True)[1:]).split()[0] for line in README_LINES if line.startswith("kimi")}
    shown |= {line.split("-m kimi_k2.cli ")[1].split()[0] for line in README_LINES if "-m kimi_k2.cli " in line}
    assert set(COMMANDS) <= shown, f"README's commands miss {sorted(set(COMMANDS) - shown)}"


@pytest.mark.parametrize("span", INLINE)
def test_readme_inline_commands_name_real_flags(span):
    """`kimi-k2 CMD --flag` in the README's prose: CMD is a command and --flag one of its options."""
    tokens = shlex.split(span)
    assert tokens[1] in COMMANDS, f"README mentions `{span}`: no command {tokens[1]!r}"
    parser = command_parser(tokens[1])
    if len(tokens) > 2 and (sub := _subparser(parser, tokens[2])) is not None:
        parser = sub
    known = {s for a in parser._actions for s in a.option_strings}
    for t in tokens[2:]:
        if t.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", t):
            assert t.split("=")[0] in known, f"README mentions `{span}`: {parser.prog} has no {t}"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_of_every_command(name, capsys):
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kimi-k2 {name}") and " ".join(COMMANDS[name][1].split()[:4]) in " ".join(out.split())
    parser = command_parser(name)
    for sub in (a.choices for a in parser._actions if isinstance(a, _SubParsersAction)):
        for action in sub:
            assert main([name, action, "--help"]) == 0


def _takes_model(name: str) -> bool:
    return any(a.dest == "model_flag" for a in command_parser(name)._actions)


MODEL_COMMANDS = [name for name in COMMANDS if _takes_model(name)]
NEEDS = {"generate": ["--prompt", "x"]}  # what else a command needs to start


def test_model_commands():
    assert set(MODEL_COMMANDS) == {"info", "plan", "generate", "bench", "serve", "chat"}


@pytest.mark.parametrize("name", MODEL_COMMANDS)
def test_model_argument_and_exit_status(name, tmp_path, capsys, monkeypatch):
    """MODEL positional or --model (not two different ones: usage error, 2); a missing model: 1, with what to pass."""
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    extra = NEEDS.get(name, [])
    assert main([name, "k2-tiny", "--model", "k2-small", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: kimi-k2 {name}") and "MODEL given twice" in err
    missing = str(tmp_path / "missing")
    for args in ([missing], ["--model", missing], [missing, "--model", missing]):
        assert main([name, *args, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"kimi-k2 {name}: error: no model at {missing}") and "pass MODEL" in err


def test_usage_errors_exit_2_and_name_the_problem(capsys):
    for argv, says in ((["nope"], "invalid choice: 'nope'"), ([], "required: COMMAND"),
                       (["info"], "required: MODEL"), (["generate", "k2-tiny"], "one of the arguments --prompt"),
                       (["bench", "--batch-size", "0"], "must be >= 1, got 0"), (["plan", "--gpus", "16"], "16xH200"),
                       (["generate", "k2-tiny", "--ids", "1 x"], "--ids takes space-separated integers"),
                       # before any model is looked for, loaded or compiled
                       (["generate", "/no-such-model", "--ids", "1 x"], "--ids takes space-separated integers")):
        assert main(argv) == 2, argv
        assert says in capsys.readouterr().err, argv


def test_no_argparse_in_library_modules():
    """Argument parsing belongs to kimi_k2/cli; the library takes typed arguments."""
    for path in (ROOT / "kimi_k2").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "kimi_k2").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            assert "argparse" not in names, f"{path.relative_to(ROOT)} imports argparse"
