"""The package graph of kimi_k2, read with `ast` from every module (imports inside functions included): imports flow
one way, and no package uses another's private (`_name`) names."""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "kimi_k2"

# package -> the kimi_k2 packages its modules may import. The spine, each importing only what lies to its right:
#     server -> engine -> model -> ops -> checkpoint -> config
# beside it: parallel (expert/tensor parallelism) sits on the model; the engine and the trainer use it; deploy
# composes engine and parallel; eval talks to a server over HTTP and imports no kimi_k2 package; data may use eval's
# benchmark environment; cli (the commands) may import anything, and it alone imports the server.
LEAVES = {"config", "tokenizer", "toolcalls"}  # formats every layer may share; they import no kimi_k2 package
ALLOWED: dict[str, set[str]] = {
    "kimi_k2": {"config"},  # the top-level __init__ (K2Config, __version__); any module may import it
    "config": set(),
    "tokenizer": set(),
    "toolcalls": set(),
    "reasoning": {"toolcalls"},  # splits <think> reasoning from content, beside the tool-call sections it ends
    "checkpoint": {"config"},
    "ops": {"checkpoint", "config"},  # compute kernels (Triton, FP8 GEMM) the model calls
    "model": {"ops", "checkpoint", "config"},
    "parallel": {"model", "ops", "checkpoint", "config"},
    "engine": {"parallel", "model", "ops", "checkpoint", "config", "tokenizer"},
    "server": {"engine", "model", "ops", "checkpoint", "config", "tokenizer", "toolcalls", "reasoning"},
    "deploy": {"engine", "parallel", "model", "ops", "checkpoint", "config", "tokenizer"},
    "train": {"parallel", "model", "ops", "checkpoint", "config", "tokenizer", "data"},
    "eval": set(),
    "data": {"eval", "tokenizer", "toolcalls", "config"},
    "cli": {"server", "engine", "parallel", "deploy", "model", "ops", "checkpoint", "config", "tokenizer",
            "toolcalls", "reasoning", "train", "data", "eval"},
}
EVAL_MUST_NOT_IMPORT = {"data", "engine", "model", "server", "train"}


@dataclass(frozen=True)
class Use:
    module: str  # kimi_k2.x.y, the module that imports
    line: int
    target: str  # the kimi_k2 module imported from
    name: str | None  # the name imported from it, or an attribute used on it; None for `import kimi_k2.x`

    @property
    def package(self) -> str:
        return package_of(self.module)

    @property
    def target_package(self) -> str:
        return package_of(self.target)

    def __str__(self) -> str:
        return f"{self.module}:{self.line}: {self.target}{'.' + self.name if self.name else ''}"


def package_of(module: str) -> str:
    """kimi_k2.engine.llm_engine -> engine; kimi_k2.toolcalls -> toolcalls; kimi_k2 -> kimi_k2."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(dotted: str) -> bool:
    path = ROOT.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def uses(path: Path) -> list[Use]:
    """Every kimi_k2 import of the module at `path`, and every `alias._name` on a name imported from kimi_k2."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[Use] = []
    bound: dict[str, str] = {}  # local name -> the kimi_k2 module (or module.name) it was imported as
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "kimi_k2":
                    found.append(Use(module, node.lineno, a.name, None))
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else "kimi_k2"
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "kimi_k2":
                continue
            for a in node.names:
                # `from kimi_k2 import model` and `from kimi_k2.model import moe` name modules, not attributes
                target, name = (f"{source}.{a.name}", None) if is_module(f"{source}.{a.name}") else (source, a.name)
                found.append(Use(module, node.lineno, target, name))
                bound[a.asname or a.name] = target if name is None else f"{target}.{name}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound \
                and is_private(node.attr):
            found.append(Use(module, node.lineno, bound[node.value.id], node.attr))
    return found


def all_uses() -> list[Use]:
    return [u for path in sorted(ROOT.rglob("*.py")) for u in uses(path)]


def test_the_table_covers_every_package_and_keeps_its_own_rules():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    packages |= {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(ALLOWED), f"place {sorted(packages - set(ALLOWED))} in ALLOWED"
    assert all(not ALLOWED[leaf] for leaf in LEAVES)
    assert [p for p, deps in ALLOWED.items() if "server" in deps] == ["cli"]  # nothing imports the server but cli
    assert not ALLOWED["eval"] & EVAL_MUST_NOT_IMPORT
    assert ALLOWED["cli"] == set(ALLOWED) - {"cli", "kimi_k2"}
    order: list[str] = []  # the graph without cli is acyclic: peel off packages whose deps are all placed
    rest = {p: deps for p, deps in ALLOWED.items() if p != "cli"}
    while rest:
        ready = [p for p, deps in rest.items() if deps <= set(order)]
        assert ready, f"cycle among {sorted(rest)}"
        order += ready
        rest = {p: deps for p, deps in rest.items() if p not in ready}


def test_the_scanner_sees_relative_imports_and_private_attributes(tmp_path, monkeypatch):
    """The rules below can fail: a module of the model importing the server, relatively and absolutely, and using
    a private name of the checkpoint package, is reported."""
    fake = tmp_path / "kimi_k2"
    (fake / "model").mkdir(parents=True)
    (fake / "checkpoint").mkdir()
    (fake / "server").mkdir()
    for p in ("model/__init__.py", "checkpoint/__init__.py", "checkpoint/reader.py", "server/__init__.py",
              "server/app.py"):
        (fake / p).write_text("")
    (fake / "model" / "bad.py").write_text(
        "from ..server import app\nimport kimi_k2.server.app\nfrom kimi_k2.checkpoint import reader\n"
        "from kimi_k2.checkpoint.reader import _walk\n\ndef f():\n    return reader._read_index\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    got = {(u.target, u.name) for u in uses(fake / "model" / "bad.py")}
    assert got == {("kimi_k2.server.app", None), ("kimi_k2.checkpoint.reader", None),
                   ("kimi_k2.checkpoint.reader", "_walk"), ("kimi_k2.checkpoint.reader", "_read_index")}


def test_imports_flow_one_way():
    bad = [f"{u}  ({u.package} may not import {u.target_package})" for u in all_uses()
           if u.target_package not in (u.package, "kimi_k2") and u.target_package not in ALLOWED[u.package]]
    assert not bad, "imports against the package graph:\n" + "\n".join(bad)


def test_eval_talks_http_only():
    bad = [str(u) for u in all_uses() if u.package == "eval" and u.target_package in EVAL_MUST_NOT_IMPORT]
    assert not bad, "eval imports product packages:\n" + "\n".join(bad)


def test_no_package_uses_another_packages_private_names():
    bad = [str(u) for u in all_uses() if u.target_package != u.package and (
        (u.name is not None and is_private(u.name)) or any(is_private(part) for part in u.target.split(".")))]
    assert not bad, "private names used across packages:\n" + "\n".join(bad)
