"""The benchmark report: built from small synthetic results files of the documented format."""

from __future__ import annotations

import base64
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

from tleg_deploy.report import ReportConfig, build_report
from tleg_deploy.report.plots import pareto_front
from tleg_deploy.report.sections import budget_ladder, nice_budget

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEVICES = ("jetson-orin-nano", "h100")


def _machine() -> dict[str, Any]:
    return {"cpu": "test cpu", "cores": 2, "date": "2026-01-01 00:00 UTC", "commit": "abc1234"}


def write_paper_claims(results: Path, depths: range = range(1, 13)) -> None:
    """An accuracy table in paper_claims' format (test input: a smooth made-up curve per init)."""
    inits = {"tleg": 0.0, "scratch": -0.08, "weight-selection": -0.03, "base-only": -0.05}
    acc = {init: {str(d): {"mean": min(0.99, 0.80 + off + 0.015 * d), "std": 0.004 + 0.001 * d,
                           "runs": [0.8, 0.81]} for d in depths} for init, off in inits.items()}
    payload = {"benchmark": "paper_claims", "machine": _machine(), "config": {"E": 4, "seeds": [0, 1]},
               "accuracy": acc,
               "storage": {"learngene_bytes": 400_000, "descendants_bytes": 15_000_000, "ratio_bytes": 37.5}}
    results.mkdir(parents=True, exist_ok=True)
    (results / "paper_claims.json").write_text(json.dumps(payload))
    (results / "paper_claims.md").write_text("## Paper claims\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")


def write_predictor_accuracy(results: Path) -> None:
    rows_by_spec = []
    for spec, slope in (("digits", 0.03), ("deit-tiny", 2.0)):
        rows = []
        for d in range(1, 25):
            measured = 0.05 + slope * d
            predicted = measured * (1 + 0.03 * ((-1) ** d))
            rows.append({"depth": d, "measured_p50_ms": measured, "predicted_p50_ms": predicted,
                         "rel_error": (predicted - measured) / measured, "in_interval": True,
                         "fit_point": d in (1, 12, 24)})
        rows_by_spec.append({"spec": spec, "fit_depths": [1, 12, 24], "within_5pct": 1.0, "within_10pct": 1.0,
                             "median_abs_error": 0.03, "max_abs_error": 0.03, "interval_coverage": 1.0,
                             "fit": {"intercept_ms": 0.05, "slope_ms_per_block": slope, "r2": 0.99,
                                     "loo_error_rel": 0.01},
                             "profiling_seconds": 1.0, "check_seconds": 2.0, "rows": rows})
    payload = {"benchmark": "predictor_accuracy", "machine": _machine(),
               "config": {"threads": 1, "batch": 1, "precision": "fp32", "load_average": [0.5, 0.6]},
               "results": rows_by_spec}
    results.mkdir(parents=True, exist_ok=True)
    (results / "predictor_accuracy.json").write_text(json.dumps(payload))


def write_solver(results: Path) -> None:
    rows = [{"spec": "digits", "budget_ms": b, "depth": d, "precision": "int8", "predicted_p90_ms": 0.5 * b,
             "predicted_p90_upper_ms": b, "measured_p90_ms": 0.6 * b, "deeper_measured_p90_ms": 1.1 * b}
            for d, b in enumerate((1.0, 1.5, 2.0, 3.0), start=2)]
    payload = {"benchmark": "solver", "machine": _machine(), "summary": {"n": 4, "within": 4, "tight": 4, "n_tight": 4},
               "rows": rows}
    results.mkdir(parents=True, exist_ok=True)
    (results / "solver.json").write_text(json.dumps(payload))


@pytest.fixture
def no_host_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLEG_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no ./profiles from the repository


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("report")
    results = tmp / "results"
    write_paper_claims(results)
    write_predictor_accuracy(results)
    write_solver(results)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLEG_DEPLOY_CACHE_DIR", str(tmp / "cache"))
        mp.chdir(tmp)
        return build_report(ReportConfig(out_dir=tmp / "out", devices=DEVICES, results_dir=results, max_depth=12))


@pytest.mark.slow
def test_full_report_writes_every_figure_and_embeds_them(full_report: Any) -> None:
    names = sorted(p.stem for p in full_report.figures)
    assert names == sorted(["latency_vs_depth", "predicted_vs_measured", "accuracy_vs_depth", "accuracy_vs_latency",
                            "storage", "solver_check"])
    for p in full_report.figures:
        w, h = png_size(p)
        assert w > 300 and h > 200
    assert not full_report.missing
    md = full_report.markdown.read_text()
    for p in full_report.figures:
        assert f"](figures/{p.name})" in md
    html = full_report.html.read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', html)
    assert len(srcs) == len(full_report.figures)
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert not re.search(r'(src|href)="(https?:|//|file:)', html), "the page must load nothing from outside"
    # No temporary files left behind.
    assert not [p for p in full_report.out_dir.rglob("*") if p.name.endswith(".tmp")]


def test_full_report_content(full_report: Any) -> None:
    md = full_report.markdown.read_text()
    # Estimated profiles are labelled and say how to measure the real device.
    assert "jetson-orin-nano is estimated" in md
    assert "tleg-deploy profile --device jetson-orin-nano" in md
    # A budget table per device, each with a pick.
    assert "### jetson-orin-nano (estimated" in md and "### h100 (estimated" in md
    assert re.search(r"\| [\d.]+ ms \| \d+ \| fp16 \|", md)
    # Accuracy table from the synthetic results, and the storage ratio from costs.py.
    assert "| 12 | 0.980 ± 0.016 |" in md
    assert "most accurate fitting depth is **" in md
    assert "Picks measured within budget: 4/4" in md
    assert re.search(r"\*\*\d+\.\dx\*\* \(fp32 weights counted by costs.py", md)
    # details demoted one level
    assert not re.search(r"^## Paper claims", md, re.M) and re.search(r"^### Paper claims", md, re.M)


@pytest.mark.slow
def test_missing_results_say_which_command_produces_them(tmp_path: Path, no_host_cache: None) -> None:
    res = build_report(ReportConfig(out_dir=tmp_path / "out", devices=("jetson",), results_dir=tmp_path / "none",
                                    max_depth=8))
    md = res.markdown.read_text()
    assert "Produce it with `.venv/bin/python benchmarks/predictor_accuracy.py`" in md
    assert "Produce it with `.venv/bin/python benchmarks/paper_claims.py`" in md
    assert "Produce it with `.venv/bin/python benchmarks/solver.py`" in md
    assert set(res.missing) == {"predicted vs measured", "solver check", "accuracy vs depth", "accuracy vs latency"}
    assert sorted(p.stem for p in res.figures) == ["latency_vs_depth", "storage"]
    assert len(re.findall(r"<img ", res.html.read_text())) == 2
    # Rebuilt with results: all figures; without them again: the stale ones are removed.
    write_paper_claims(tmp_path / "res2", depths=range(1, 4))
    again = build_report(ReportConfig(out_dir=tmp_path / "out", devices=("jetson",), results_dir=tmp_path / "res2",
                                      max_depth=8))
    assert (tmp_path / "out" / "figures" / "accuracy_vs_depth.png") in again.figures
    build_report(ReportConfig(out_dir=tmp_path / "out", devices=("jetson",), results_dir=tmp_path / "none",
                              max_depth=8))
    assert sorted(p.stem for p in (tmp_path / "out" / "figures").iterdir()) == ["latency_vs_depth", "storage"]


def test_unusable_results_file_is_reported_not_raised(tmp_path: Path, no_host_cache: None) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "paper_claims.json").write_text("{not json")
    (results / "predictor_accuracy.json").write_text(json.dumps({"benchmark": "predictor_accuracy", "results": [{}]}))
    res = build_report(ReportConfig(out_dir=tmp_path / "out", devices=("jetson",), results_dir=results, max_depth=4))
    md = res.markdown.read_text()
    assert "paper_claims.json` could not be read" in md
    assert "lacks a field the report needs" in md


def test_family_manifest_is_used_for_storage(tiny_lg: Any, tmp_path: Path, no_host_cache: None) -> None:
    from tleg_deploy.export.family import export_family

    manifest = export_family(tiny_lg, [1, 2, 3], tmp_path / "fam", "onnx", data=None)
    fp32 = {a["depth"]: a["bytes"] for a in manifest["artifacts"] if a["precision"] == "fp32"}
    lg_bytes = manifest["storage"]["learngene_bytes"]
    res = build_report(ReportConfig(out_dir=tmp_path / "out", devices=("jetson",), family=tmp_path / "fam",
                                    results_dir=tmp_path / "none", max_depth=4))
    md = res.markdown.read_text()
    total = sum(fp32.values())
    assert f"Learngene: {lg_bytes:,} bytes. Descendants 1-3 stored separately: {total:,} bytes, " \
           f"**{total / lg_bytes:.1f}x** (fp32 ONNX files of the exported family" in md


def test_budget_helpers() -> None:
    assert nice_budget(0.37) == 0.5 and nice_budget(7) == 5 and nice_budget(1.4) == 1
    ladder = budget_ladder(0.08, 1.3)
    assert ladder[0] <= 0.08 and ladder[-1] >= 1.3
    assert all(a < b for a, b in zip(ladder, ladder[1:], strict=False))
    assert len(budget_ladder(0.001, 1e6)) <= 8
    pts = [(1, 1.0, 0.5), (2, 2.0, 0.7), (3, 3.0, 0.6), (4, 4.0, 0.9), (5, 0.5, 0.4)]
    assert [p[0] for p in pareto_front(pts)] == [5, 1, 2, 4]


# -- CLI ---------------------------------------------------------------------------------------------
def _invoke(*args: str) -> Any:
    import os

    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app

    env = {k: v for k, v in os.environ.items() if k != "TLEG_DEBUG"}
    return CliRunner().invoke(app, list(args), env=env)


def test_cli_help_has_example() -> None:
    result = _invoke("report", "--help")
    assert result.exit_code == 0, result.output
    assert "Example: tleg-deploy report" in result.output


@pytest.mark.parametrize("args, needle", [
    (("--device", "no-such-device"), "unknown device 'no-such-device'"),
    (("--latency", "5 parsecs"), "unknown time unit"),
    (("--learngene", "missing.safetensors"), "missing.safetensors"),
    (("--family", str(Path(__file__).parent)), "no manifest.json"),  # a directory outside the output
    (("--results", "no-such-results-dir"), "results directory 'no-such-results-dir' does not exist"),
])
def test_cli_errors_are_one_line(tmp_path: Path, no_host_cache: None, args: tuple[str, ...], needle: str) -> None:
    result = _invoke("report", "-o", str(tmp_path / "out"), "--quiet", *args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not (tmp_path / "out" / "report.html").exists()


def test_cli_json(tmp_path: Path, no_host_cache: None) -> None:
    write_paper_claims(tmp_path / "results", depths=range(1, 5))
    result = _invoke("report", "-o", str(tmp_path / "out"), "--device", "jetson", "--max-depth", "4",
                     "--results", str(tmp_path / "results"), "--latency", "0.2ms", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert Path(data["html"]).is_file() and len(data["figures"]) == 4
    assert list(data["missing"]) == ["predicted vs measured", "solver check"]
    assert "Budget: 0.2 ms (--latency)" in Path(data["markdown"]).read_text()


def test_run_all_dry_run_and_bad_name() -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"
    ok = subprocess.run([sys.executable, str(script), "--dry-run", "--only", "solver,export_family"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "benchmarks: export_family, solver" in ok.stdout and "expected duration" in ok.stdout
    bad = subprocess.run([sys.executable, str(script), "--dry-run", "--only", "nope"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "unknown benchmark 'nope'" in bad.stderr


def test_custom_spec_without_profiles_says_how_to_measure(tiny_lg: Any, tmp_path: Path, no_host_cache: None) -> None:
    path = tmp_path / "lg.safetensors"
    tiny_lg.save(path)
    write_paper_claims(tmp_path / "results", depths=range(1, 4))
    # A measured profile covers only what was measured (an estimated one answers for any spec, below).
    import dataclasses

    from tleg_deploy.profile.registry import resolve_profile

    lab = tmp_path / "lab.json"
    dataclasses.replace(resolve_profile("jetson"), name="lab", aliases=(), source="measured").save(lab)
    res = build_report(ReportConfig(out_dir=tmp_path / "out", devices=(str(lab),), learngene=str(path),
                                    results_dir=tmp_path / "results", max_depth=4))
    md = res.markdown.read_text()
    assert "No device profile covers custom spec" in md and "`--device host`" in md
    assert "The accuracy table was measured on digits" in md
    assert res.warnings and "has no entry for custom spec" in res.warnings[0]
    assert sorted(p.stem for p in res.figures) == ["accuracy_vs_depth", "storage"]
    est = build_report(ReportConfig(out_dir=tmp_path / "out2", devices=("jetson",), learngene=str(path),
                                    results_dir=tmp_path / "results", max_depth=4))
    assert not est.warnings and "No device profile covers" not in est.markdown.read_text()


def test_a_measured_profile_of_this_host_is_probed_for_drift(tmp_path: Path, no_host_cache: None) -> None:
    """``report`` probes a cached measured profile of this host before using it, as fit and solve do, and says the
    drift in the report; another host's or an estimated profile is used as it is."""
    import dataclasses

    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile.config import MeasureConfig
    from tleg_deploy.profile.measure import profile

    prof = profile(ViTSpec.preset("digits"), name="mybox", config=MeasureConfig(depths=(1, 2), rounds=2,
                                                                                 memory=False, gemm=False),
                   learngene=load_learngene("demo"))
    assert prof.probe is not None
    prof.save(tmp_path / "profiles" / "mybox.json")
    dataclasses.replace(prof, name="otherbox", host_fingerprint="elsewhere").save(tmp_path / "profiles" /
                                                                                  "otherbox.json")
    res = build_report(ReportConfig(out_dir=tmp_path / "out", devices=("mybox", "otherbox", "jetson"),
                                    results_dir=None, max_depth=12))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "drift probe of mybox" in text and "drift probe of otherbox" not in text
    assert any(w.startswith("drift probe of mybox") for w in res.warnings)
