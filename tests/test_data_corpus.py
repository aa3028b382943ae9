import gzip
import json

import pytest

from kimi_k2.data import corpus


def test_pydoc_topics_are_english_docs():
    docs = list(corpus.pydoc_topics())
    titles = {d["title"] for d in docs}
    assert {"assignment", "if", "for"} <= titles
    assert all(d["license"] == "PSF-2.0" and d["text"] for d in docs)
    assert "else" in next(d["text"] for d in docs if d["title"] == "if")


def test_docstrings_read_without_importing(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "tests").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""The package docstring, long enough to be kept in the corpus at all."""\n'
                                     'raise SystemExit("importing this file would stop the test run")\n')
    (pkg / "mod.py").write_text('"""Module doc."""\n\ndef f():\n    """' + "Explains f. " * 10 + '"""\n\n'
                                'def g():\n    """short"""\n')
    (pkg / "tests" / "t.py").write_text('"""' + "skipped " * 20 + '"""\n')
    (pkg / "broken.py").write_text("def (:\n")
    docs = {d["title"]: d["text"] for d in corpus.stdlib_docstrings(tmp_path, min_chars=40)}
    assert set(docs) == {"pkg", "pkg.mod"}
    assert docs["pkg.mod"].startswith("Module doc.\n\nf: Explains f.") and "short" not in docs["pkg.mod"]


def test_roff_to_text():
    roff = ('.\\" a comment\n.TH LS 1\n.SH NAME\nls \\- list directory contents\n.SH DESCRIPTION\n'
            '.B ls\nlists \\fIfiles\\fR and\\ more.\n.PP\nSee \\(lqinfo\\(rq.\n')
    text = corpus.roff_to_text(roff)
    assert text == 'NAME\nls - list directory contents\n\nDESCRIPTION\nls\nlists files and more.\n\nSee "info".'


def test_man_pages_from_a_tree(tmp_path):
    (tmp_path / "man1").mkdir()
    (tmp_path / "man1" / "tool.1.gz").write_bytes(gzip.compress(b".SH NAME\ntool \\- does things\n"))
    (tmp_path / "man1" / "alias.1.gz").write_bytes(gzip.compress(b".so man1/tool.1\n"))
    docs = list(corpus.man_pages(tmp_path, sections="1"))
    assert [(d["title"], d["text"]) for d in docs] == [("tool.1", "NAME\ntool - does things")]


def test_documents_dedup_and_unknown_source(monkeypatch):
    twice = [{"source": "x", "title": "a", "license": "l", "text": "same"}] * 2
    monkeypatch.setitem(corpus.READERS, "pydoc", lambda: iter(twice))
    assert len(list(corpus.documents(["pydoc"]))) == 1
    with pytest.raises(ValueError, match="unknown corpus sources \\['wiki'\\]"):
        list(corpus.documents(["wiki"]))


def test_cli_corpus(tmp_path):
    from kimi_k2.cli import main

    out = tmp_path / "c.jsonl"
    assert main(["data", "corpus", "--out", str(out), "--sources", "pydoc,licenses"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["source"] for r in rows} <= {"pydoc", "licenses"} and len(rows) >= 70
    assert rows == list(corpus.documents(["pydoc", "licenses"]))  # deterministic


def test_cli_corpus_bad_source_loses_nothing(tmp_path, capsys):
    from kimi_k2.cli import main

    out = tmp_path / "c.jsonl"
    out.write_text("an earlier corpus\n")
    assert main(["data", "corpus", "--out", str(out), "--sources", "pydoc,wiki"]) == 1
    assert "kimi-k2 data: error: unknown corpus sources ['wiki']" in capsys.readouterr().err
    assert main(["data", "corpus", "--out", str(out), "--sources", ","]) == 1
    assert "kimi-k2 data: error: no corpus sources given" in capsys.readouterr().err
    assert out.read_text() == "an earlier corpus\n"
