"""The folders are the layers (README "How it fits together"): imports point downward only.

Read from the source with ``ast`` (no imports executed), so a new upward import fails here with the
file and line that made it. Lazy imports inside functions count too: a layer that needs something
above it at run time is still upside down.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tleg_deploy"

# Which sibling folders each layer may import. `errors` is below everything; `cli` above everything.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "files": {"errors"},
    "plan": {"errors", "files", "model.spec", "profile.table"},
    "model": {"errors", "files", "plan"},
    "train": {"errors", "files", "model", "plan"},
    "profile": {"errors", "files", "model", "plan", "export"},
    "export": {"errors", "files", "model", "plan", "profile", "train"},
    "deploy": {"errors", "files", "model", "plan", "profile", "export", "train"},
    "report": {"errors", "files", "model", "plan", "profile", "export"},
    "cli": {"errors", "files", "model", "plan", "profile", "export", "train", "deploy", "report"},
    "__main__": {"cli"},
}


def _layer(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, 'layer' or 'layer.module') for every tleg_deploy import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tleg_deploy":
                names = [a.name for a in node.names]
            elif node.module.startswith("tleg_deploy."):
                names = [node.module.removeprefix("tleg_deploy.")]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("tleg_deploy.") for a in node.names if a.name.startswith("tleg_deploy.")]
        found += [(node.lineno, n) for n in names]
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_downward(path: Path) -> None:
    layer = _layer(path)
    allowed = ALLOWED[layer]
    for line, target in _imports(path):
        top = target.split(".")[0]
        if top in {layer, "__version__"}:
            continue
        two = ".".join(target.split(".")[:2])
        assert top in allowed or two in allowed, (
            f"{path.relative_to(PACKAGE)}:{line} imports tleg_deploy.{target}: layer {layer!r} may import "
            f"only {sorted(allowed)}")


def test_every_folder_has_a_layer() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= set(ALLOWED), f"new folder(s) without a place in the layer table: {folders - set(ALLOWED)}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from tleg_deploy.cli.app import app\n")
    assert _imports(bad) == [(2, "cli.app")]
