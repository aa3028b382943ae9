"""A small English pretraining corpus from text that every Debian + CPython machine already has.

Sources (each document records its source and licence):
- `pydoc`: CPython's `pydoc_data/topics.py`, the language reference topics `help()` shows. PSF License 2.0.
- `docstrings`: module, class and function docstrings of the CPython standard library, read with `ast` (no module is
  imported, so nothing runs). PSF License 2.0. Tests, idlelib, tkinter demos, turtledemo and site-packages are skipped.
- `licenses`: Debian's `/usr/share/common-licenses` texts (GPL, Apache, BSD, MPL, ...). Each text permits verbatim
  copying and distribution; the corpus uses them verbatim.
- `man` (opt-in): English man pages under `/usr/share/man/man{1,5,7,8}`, roff markup stripped. They come from many
  packages under many licences (all DFSG-free on Debian main, but mixed and not always present on minimal images, so
  not in the default set).
Documents come out in a fixed order with exact duplicates dropped, so the corpus is the same on machines with the same
Python and Debian packages.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

SOURCES = ["pydoc", "docstrings", "licenses", "man"]
DEFAULT_SOURCES = ["pydoc", "docstrings", "licenses"]
SKIP_DIRS = {"test", "tests", "idlelib", "turtledemo", "site-packages", "lib2to3", "__pycache__", "ensurepip"}
PSF = "PSF-2.0"


def pydoc_topics() -> Iterator[dict]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"source": "pydoc", "title": name, "license": PSF, "text": topics[name].strip()}


def stdlib_docstrings(root: Path | None = None, min_chars: int = 80) -> Iterator[dict]:
    """One document per stdlib module: its docstring, then 'name: docstring' for each documented class/function."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately invalid (bad-syntax fixtures)
        parts = [ast.get_docstring(tree) or ""]
        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    parts.append(f"{node.name}: {doc}")
        text = "\n\n".join(p for p in parts if p).strip()
        if len(text) >= min_chars:
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            yield {"source": "docstrings", "title": module, "license": PSF, "text": text}


def common_licenses(root: Path = Path("/usr/share/common-licenses")) -> Iterator[dict]:
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.is_symlink():
            yield {"source": "licenses", "title": path.name, "license": "verbatim copying permitted",
                   "text": path.read_text(encoding="utf-8", errors="replace").strip()}


_ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\\(em"), "--"),
                 (re.compile(r"\\\((aq|cq)"), "'"), (re.compile(r"\\\((lq|rq|dq)"), '"'),
                 (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""), (re.compile(r"\\[-]"), "-"),
                 (re.compile(r"\\e"), "\\\\"), (re.compile(r"\\[&|^%:]"), ""), (re.compile(r"\\ "), " ")]


def roff_to_text(roff: str) -> str:
    """Plain text of a man page: requests (.XX lines) dropped except the text they carry; font escapes removed."""
    out = []
    for line in roff.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}')):
            continue
        if line.startswith((".", "'")):
            request, _, rest = line[1:].partition(" ")
            if request in ("SH", "SS"):
                out.append("\n" + rest.strip('"'))
            elif request in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "TP", "IP", "Nm", "Nd", "Ar", "Fl"):
                out.append(rest.replace('"', ""))
            elif request in ("PP", "P", "LP", "sp", "br"):
                out.append("")
            continue
        out.append(line)
    text = "\n".join(out)
    for pattern, repl in _ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def man_pages(root: Path = Path("/usr/share/man"), sections: str = "1578") -> Iterator[dict]:
    for s in sections:
        for path in sorted((root / f"man{s}").glob("*.gz")):
            try:
                roff = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            except (OSError, EOFError):
                continue
            if roff.startswith(".so "):  # a link to another page
                continue
            text = roff_to_text(roff)
            if text:
                yield {"source": "man", "title": path.name.removesuffix(".gz"), "license": "per-package (Debian)",
                       "text": text}


READERS = {"pydoc": pydoc_topics, "docstrings": stdlib_docstrings, "licenses": common_licenses, "man": man_pages}


def check_sources(sources: list[str]) -> None:
    unknown = [s for s in sources if s not in READERS]
    if unknown or not sources:
        raise ValueError(f"unknown corpus sources {unknown}; choose from {SOURCES}" if unknown else
                         f"no corpus sources given; choose from {SOURCES}")


def documents(sources: list[str] = DEFAULT_SOURCES) -> Iterator[dict]:
    """All documents of `sources`, in order, exact duplicates (by text) dropped."""
    check_sources(sources)
    seen = set()
    for s in sources:
        for doc in READERS[s]():
            digest = hashlib.sha256(doc["text"].encode()).digest()
            if digest not in seen:
                seen.add(digest)
                yield doc


def write(path: Path, sources: list[str] = DEFAULT_SOURCES) -> dict[str, tuple[int, int]]:
    """Write the corpus as JSONL ({source, title, license, text} per line); returns {source: (documents, chars)}."""
    check_sources(sources)  # before the file is opened, so a bad source loses nothing
    stats: dict[str, tuple[int, int]] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents(sources):
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n, c = stats.get(doc["source"], (0, 0))
            stats[doc["source"]] = (n + 1, c + len(doc["text"]))
    return stats
