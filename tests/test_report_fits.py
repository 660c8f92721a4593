"""``tleg-deploy report --fit DIR``: the user's fits in the report; benchmark results only for the
learngene they were made for (the demo's accuracies never appear under another learngene's name)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tleg_deploy.cli.app import app


def _invoke(*args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if k != "TLEG_DEBUG"}
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TLEG_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _claims(results: Path, sha: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "paper_claims", "learngene": {"sha256": sha},
               "accuracy": {"tleg": {"1": {"mean": 0.5, "std": 0.01}, "2": {"mean": 0.6, "std": 0.01}}}}
    (results / "paper_claims.json").write_text(json.dumps(payload))


def _custom_learngene(path: Path) -> str:
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.spec import ViTSpec

    lg = Learngene.init(ViTSpec.preset("digits"), aux_depth=2, seed=3)
    lg.save(path)
    return lg.sha256()


def test_report_reads_the_format_fit_writes() -> None:
    from tleg_deploy.deploy.fit_types import FIT_FORMAT
    from tleg_deploy.report.fits import FIT_FORMAT as READ

    assert READ == FIT_FORMAT


def test_report_shows_a_fit(here: Path) -> None:
    res = _invoke("fit", "--device", "jetson", "--latency", "1ms", "--max-depth", "2", "-o", "fit-j", "--quiet")
    assert res.exit_code == 0, res.output
    res = _invoke("report", "--fit", "fit-j", "--device", "jetson", "--max-depth", "4", "-o", "rep", "--quiet")
    assert res.exit_code == 0, res.output
    md = (here / "rep" / "report.md").read_text()
    plan = json.loads((here / "fit-j" / "plan.json").read_text())
    section = md.split("## Your fits", 1)[1]
    assert f"depth {plan['depth']} {plan['precision']}" in section and "| latency p90 |" in section
    assert "not measured (estimated)" in section and "Classes (10): 0, 1, 2" in section
    assert f"depth_{plan['depth']:02d}/model.onnx" in section
    res = _invoke("report", "--fit", str(here), "-o", "rep2", "--quiet")  # not a fit directory
    assert res.exit_code == 2 and "is not a fit output directory" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_results_of_another_learngene_are_refused_in_one_line(here: Path) -> None:
    _custom_learngene(here / "mine.safetensors")
    _claims(here / "demo-results", "0" * 64)
    res = _invoke("report", "--learngene", "mine.safetensors", "--results", "demo-results", "--device", "jetson",
                  "-o", "rep", "--quiet")
    assert res.exit_code == 2, res.output
    assert "were made for learngene 000000000000" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (here / "rep" / "report.md").exists()


def test_default_results_are_used_only_for_their_own_learngene(here: Path) -> None:
    sha = _custom_learngene(here / "mine.safetensors")
    _claims(here / "benchmarks" / "results", "0" * 64)  # a checkout's results, made for another learngene
    res = _invoke("report", "--learngene", "mine.safetensors", "--device", "jetson", "--max-depth", "4",
                  "-o", "rep", "--json")
    assert res.exit_code == 0, res.output
    md = (here / "rep" / "report.md").read_text()
    assert "are left out for this learngene" in md and "_Not in this report" in md
    assert not json.loads(res.stdout)["missing"]  # nothing to "run benchmarks/..." for
    (here / "benchmarks" / "results" / "paper_claims.json").unlink()
    _claims(here / "benchmarks" / "results", sha)  # now made for it: used
    res = _invoke("report", "--learngene", "mine.safetensors", "--device", "jetson", "--max-depth", "4",
                  "-o", "rep", "--json")
    assert res.exit_code == 0, res.output
    assert "are left out" not in (here / "rep" / "report.md").read_text()


def test_an_interrupted_report_leaves_a_directory_the_next_run_owns(tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C after report.md was written but before the end: the rerun needs no --force."""
    import tleg_deploy.report.html as html
    from tleg_deploy.report import ReportConfig, build_report

    cfg = ReportConfig(out_dir=tmp_path / "rep", results_dir=None, devices=("jetson",), max_depth=4)

    def interrupted(*_a, **_k):  # the HTML step, after report.md is on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(html, "markdown_to_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_report(cfg)
    assert (tmp_path / "rep" / "report.md").is_file()
    monkeypatch.undo()
    result = build_report(cfg)  # no OutputError: the directory is recognizably ours
    assert result.html.is_file()


def test_a_fit_whose_learngene_is_gone_is_not_reported_as_the_demo(here: Path) -> None:
    _custom_learngene(here / "mine.safetensors")
    res = _invoke("fit", "--learngene", "mine.safetensors", "--device", "jetson", "--latency", "1ms",
                  "--max-depth", "2", "-o", "fit-m", "--quiet")
    assert res.exit_code == 0, res.output
    (here / "mine.safetensors").unlink()
    res = _invoke("report", "--fit", "fit-m", "--device", "jetson", "-o", "rep", "--quiet")
    assert res.exit_code == 2 and "no longer there" in res.output and not (here / "rep").exists()
