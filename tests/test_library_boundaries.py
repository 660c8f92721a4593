"""Library modules take what they read as arguments: none edits PYTHONPATH or reaches into this
repository's ``benchmarks/`` folder (the CLI, ``tleg_deploy/cli``, holds those defaults)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tleg_deploy"
LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts)


def _code_strings(path: Path) -> list[str]:
    """String constants and keyword-argument names of a module (``dict(os.environ, PYTHONPATH=...)``),
    docstrings left out (they may cite a benchmark script)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    keywords = [node.arg for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg]
    return keywords + [node.value for node in ast.walk(tree)
                       if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_the_scan_finds_the_library() -> None:
    assert len(LIBRARY) > 40 and PACKAGE / "profile" / "memory.py" in LIBRARY
    assert not any("cli" in p.parts for p in LIBRARY)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_neither_edits_pythonpath_nor_reads_benchmarks(path: Path) -> None:
    for text in _code_strings(path):
        assert "PYTHONPATH" not in text, f"{path.name} edits PYTHONPATH: pass paths explicitly"
        assert not text.strip("/").startswith("benchmarks"), f"{path.name} builds a path into benchmarks/: {text!r}"


def test_the_check_catches_a_path_into_benchmarks(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('"""Reads benchmarks/results."""\nROOT = "x"\nP = ROOT + "/benchmarks/results"\n'
                   'import os\nos.environ["PYTHONPATH"] = ROOT\nENV = dict(os.environ, PYTHONPATH=ROOT)\n')
    found = _code_strings(bad)
    assert "/benchmarks/results" in found and found.count("PYTHONPATH") == 2
    assert "Reads benchmarks/results." not in _code_strings(bad)
