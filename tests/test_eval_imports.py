"""kimi_k2/eval stands alone: it imports the standard library, `openai` (it talks to a model over HTTP only) and
itself, never the training data, the model or the server; and no module of eval/ or data/ uses another module's
private names."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kimi_k2"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in `path`, relative imports resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = ("kimi_k2." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)).split(".")
                module = ".".join(parts[:-node.level] + ([module] if module else []))
            out.append((module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("path", sorted((PACKAGE / "eval").glob("*.py")), ids=lambda p: p.name)
def test_eval_imports_only_stdlib_openai_and_itself(path: Path) -> None:
    for module, _ in imports(path):
        top = module.split(".")[0]
        assert top in sys.stdlib_module_names or top == "openai" or module.startswith("kimi_k2.eval"), (path, module)


@pytest.mark.parametrize("path", sorted([*(PACKAGE / "eval").glob("*.py"), *(PACKAGE / "data").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_private_names_across_modules(path: Path) -> None:
    for module, names in imports(path):
        assert not [n for n in names if n.startswith("_")], (path, module, names)
