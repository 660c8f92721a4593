"""The benchmark scripts check ``--specs`` / ``--spec`` before any work: a wrong preset name is one usage line
(argparse, exit 2), not a traceback minutes into a run; and a results file is written whole or not at all."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def results(benchmarks_importable: Path) -> ModuleType:
    return importlib.import_module("_results")


def test_spec_names_reads_a_list_and_refuses_unknown_names(results: ModuleType) -> None:
    assert results.spec_names("deit-tiny, digits") == ["deit-tiny", "digits"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown spec preset.*'nope'.*choose from.*deit-tiny"):
        results.spec_names("digits,nope")
    with pytest.raises(argparse.ArgumentTypeError):
        results.spec_names(" , ")
    assert results.spec_name("digits") == "digits"
    with pytest.raises(argparse.ArgumentTypeError, match="one spec preset"):
        results.spec_name("digits,deit-tiny")


def test_a_wrong_spec_is_one_usage_line(results: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    ap = argparse.ArgumentParser(prog="solver.py")
    ap.add_argument("--specs", type=results.spec_names, default="deit-tiny,digits")
    assert ap.parse_args([]).specs == ["deit-tiny", "digits"]  # argparse converts a string default too
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--specs", "deit-tiny,dig1ts"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("solver.py: error: argument --specs: unknown spec preset(s) 'dig1ts'")


def _spec_options() -> Iterator[tuple[str, str, Any]]:
    """(script, option, the ``type=`` it is parsed with) for every --spec/--specs option of a benchmark."""
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument" and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in ("--spec", "--specs")):
                kind = next((k.value for k in node.keywords if k.arg == "type"), None)
                yield path.name, node.args[0].value, kind.id if isinstance(kind, ast.Name) else kind


def test_every_benchmark_checks_its_spec_option() -> None:
    found = list(_spec_options())
    assert len(found) >= 6, found  # solver, loop_rules, kit_prediction, export_speed, predictor_accuracy, export_family
    for script, option, kind in found:
        assert kind == {"--specs": "spec_names", "--spec": "spec_name"}[option], f"{script} {option} is not checked"


def test_write_result_leaves_the_previous_file_when_interrupted(results: ModuleType, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    (tmp_path / "x.json").write_text('{"old": true}\n')

    class Interrupt(Exception):
        pass

    def half_then_interrupted(self: Path, text: str, *args: Any, **kwargs: Any) -> int:
        with open(self, "w") as f:  # as a Ctrl-C half-way through writing the file
            f.write(text[: len(text) // 2])
        raise Interrupt

    monkeypatch.setattr(Path, "write_text", half_then_interrupted)
    with pytest.raises(Interrupt):
        results.write_result("x", {"new": 1}, "# x")
    assert json.loads((tmp_path / "x.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]  # no temporary file left behind


def test_write_result_writes_strict_json(results: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Benchmarks say "not measured" with NaN in memory (an infeasible budget's row): the results file says null, as
    strict JSON readers (jq, JavaScript) need; paths are written as text."""
    import math

    make_results = importlib.import_module("make_results")
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(make_results, "build", lambda: None)  # not the real RESULTS.md
    results.write_result("x", {"rows": [{"ms": math.nan, "ok": 1.5, "inf": -math.inf, "where": tmp_path,
                                         "pair": (1, math.nan)}]}, "# x")

    def refuse(name: str) -> None:
        raise AssertionError(f"bare {name} in the results file")

    data = json.loads((tmp_path / "x.json").read_text(), parse_constant=refuse)
    assert data["rows"] == [{"ms": None, "ok": 1.5, "inf": None, "where": str(tmp_path), "pair": [1, None]}]
