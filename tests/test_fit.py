"""``tleg-deploy fit`` end to end on estimated profiles, its errors and its outputs; ``fit`` on a measured host
profile: tests/test_walkthrough.py (on the profile the README's walk-through measured)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import check_fit_dir as _check_dir
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.model.spec import ViTSpec

runner = CliRunner()


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "jetson", "--latency", "5parsecs"], "time unit"),
    (["--device", "jetson", "--latency", "-1ms"], "positive"),
    (["--device", "jetson", "--latency", "1us"], "no depth fits"),
    (["--device", "jetson"], "no limit"),
    (["--device", "nosuch", "--latency", "5ms"], "unknown device 'nosuch'"),
    (["--device", "jetson", "--latency", "5ms", "--learngene", "missing.safetensors"], "missing.safetensors"),
    (["--device", "jetson", "--latency", "5ms", "--objective", "fastest"], "unknown objective"),
])
def test_fit_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["fit", "-o", str(tmp_path / "x"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no output directory, no staging directory


def test_fit_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["fit", "--device", "jetson", "--latency", "1ms", "-o", str(tmp_path / "mine")])
    assert res.exit_code == 2 and "already holds files tleg-deploy did not write, e.g. notes.txt" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


@pytest.mark.slow
def test_fit_interrupted_leaves_nothing(tmp_path: Path) -> None:
    from tleg_deploy.deploy.fit import fit
    from tleg_deploy.deploy.fit_types import FitRequest
    from tleg_deploy.plan.solve import Budget

    def interrupt_after_export(msg: str) -> None:
        if msg.startswith("exported and validated"):  # the staging directory holds a whole export by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(FitRequest(Budget(latency_ms=1.0), device="jetson", out_dir=tmp_path / "out"), log=interrupt_after_export)
    assert list(tmp_path.iterdir()) == []


def test_fit_with_finetuning_exports_the_trained_weights_once(tmp_path: Path) -> None:
    from tleg_deploy.deploy.fit import fit
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.model.expansion import expand, load_descendant
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.plan.solve import Budget

    messages: list[str] = []
    out = tmp_path / "ft"
    res = fit(FitRequest(Budget(latency_ms=1.0), device="jetson", out_dir=out, finetune_data="digits", epochs=1,
                         search=SearchOptions(max_depth=2)), log=messages.append)
    assert res.depth == 2 and res.figures == "estimated" and res.finetune and res.finetune["epochs"] == 1
    assert sum(m.startswith("exported and validated") for m in messages) == 1  # not the expansion, then the trained
    plan = _check_dir(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["members"]["2"]["source"] == "finetune:digits:1"
    trained, _ = load_descendant(out / plan["weights"]["file"])
    expanded = expand(load_learngene("demo"), 2)
    assert not torch.equal(trained.head.weight, expanded.head.weight)  # the weights written are the trained ones


@pytest.mark.parametrize("bad", [["--objective", "fastest"], ["--precision", "fp8"], ["--margin", "1.5"]])
def test_bad_search_options_are_rejected_before_the_device_is_measured(
    bad: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tleg_deploy.profile import registry

    def no_measuring(*_a: object, **_k: object) -> None:
        raise AssertionError("the device profile was resolved (host would be measured) before the options were checked")

    monkeypatch.setattr(registry, "resolve_profile", no_measuring)
    res = runner.invoke(app, ["fit", "--device", "host", "--latency", "1ms", "-o", str(tmp_path / "out"), *bad])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [{"search": {"objective": "fastest"}}, {"search": {"precisions": ("fp8",)}},
                                 {"search": {"margin": 1.5}}, {"search": {"objective": "accuracy"}},
                                 {"epochs": 0}, {"max_steps": -1}])
def test_a_fit_request_is_checked_when_made(bad: dict, tmp_path: Path) -> None:
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.errors import TlegError
    from tleg_deploy.plan.solve import Budget

    fields = {k: v for k, v in bad.items() if k != "search"}
    with pytest.raises(TlegError):
        if "search" in bad:
            SearchOptions(**bad["search"])
        FitRequest(Budget(latency_ms=1.0), device="host", out_dir=tmp_path / "out", **fields)
    ok = FitRequest(Budget(latency_ms=1.0), device="host", out_dir=str(tmp_path / "out"),  # type: ignore[arg-type]
                    search=SearchOptions(precisions=["int8"]))  # type: ignore[arg-type]
    assert ok.out_dir == tmp_path / "out" and ok.search.precisions == ("int8",)


def test_a_precision_that_fails_validation_is_rejected_and_the_solver_picks_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int8 cannot pass (agreement threshold above 100%): fit says why, falls back to fp16, and the
    directory describes itself (labels.json, ONNX metadata, a REPORT snippet that runs)."""
    import re
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from tleg_deploy.deploy.fit import fit
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.export import validate
    from tleg_deploy.export.onnx import read_metadata
    from tleg_deploy.plan.solve import Budget

    monkeypatch.setitem(validate.MIN_AGREEMENT, "int8", 1.01)
    monkeypatch.setitem(validate.MIN_AGREEMENT, "int8-qdq", 1.01)
    messages: list[str] = []
    out = tmp_path / "fb"
    res = fit(FitRequest(Budget(latency_ms=1.0), device="jetson", out_dir=out, calib_data="digits",
                         search=SearchOptions(max_depth=2, precisions=("int8", "fp16"))), log=messages.append)
    assert res.precision == "fp16" and "int8" in res.rejected and "agreement" in res.rejected["int8"]
    assert any(m.startswith("int8 rejected") for m in messages)
    plan = _check_dir(out)
    assert "agreement" in plan["rejected_precisions"]["int8"]
    assert not list(out.rglob("*int8*"))  # the rejected precision's files are not shipped
    report = (out / "REPORT.md").read_text()
    assert "Precision int8 rejected" in report and "| - | int8 |" in report
    labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == [str(i) for i in range(10)] and labels["preprocessing"]["mode"] == "L"
    member = out / f"depth_{plan['depth']:02d}"
    assert json.loads(read_metadata(member / "model_fp16.onnx")["data"])["classes"] == labels["classes"]

    snippet = re.search(r"```python\n(.*?)```", report, re.S)
    assert snippet is not None and len(snippet.group(1).strip().splitlines()) <= 10
    (tmp_path / "run.py").write_text(snippet.group(1))
    Image.fromarray(np.eye(8, dtype=np.uint8) * 255).save(tmp_path / "img.png")
    run = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "img.png")], cwd=out,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() in labels["classes"]


def test_every_precision_failing_is_one_error_naming_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tleg_deploy.deploy.fit import fit
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.errors import InfeasibleError
    from tleg_deploy.export import validate
    from tleg_deploy.plan.solve import Budget

    monkeypatch.setitem(validate.MIN_AGREEMENT, "int8-qdq", 1.01)
    with pytest.raises(InfeasibleError, match="every precision failed its validation: int8 rejected"):
        fit(FitRequest(Budget(latency_ms=1.0), device="jetson", out_dir=tmp_path / "x",
                       search=SearchOptions(max_depth=2, precisions=("int8",))))
    assert list(tmp_path.iterdir()) == []


def test_report_candidates_follow_the_measured_step_down() -> None:
    """A depth measured over budget is "no" in REPORT.md, with its measurement, not "yes"."""
    import dataclasses

    from tleg_deploy.deploy.fit_report import render_report
    from tleg_deploy.deploy.fit_types import FitResult
    from tleg_deploy.plan.solve import Budget, evaluate, solve
    from tleg_deploy.plan.units import format_metrics
    from tleg_deploy.profile.registry import resolve_profile

    spec = ViTSpec.preset("digits")
    prof = resolve_profile("jetson", spec=spec)
    plan = solve(prof, Budget(latency_ms=1.0), spec=spec, max_depth=6, precisions=("int8",))
    shallower = evaluate(prof, plan.budget, spec=spec, depth=plan.depth - 1, precision="int8")
    res = FitResult(plan=plan, pick=shallower, out_dir=Path("x"), files=(), measured=None,
                    steps=(f"depth {plan.depth} measured p90 1.02 ms > 1 ms: stepped to depth {plan.depth - 1}",),
                    over_budget={plan.depth: 1.02})
    report = render_report(res, prof, "depth_05/model_int8_qdq.onnx")
    line = next(la for la in report.splitlines() if la.startswith(f"| {plan.depth} | int8 |"))
    assert "no: measured p90 1.02 ms > 1 ms" in line and "yes" not in line
    assert format_metrics({"val_acc": 0.22905027932960895, "epochs": 2}) == "val_acc 22.9%, epochs 2"
    assert "0.229050" not in render_report(dataclasses.replace(res, finetune={"val_acc": 0.22905027932960895}),
                                           prof, "f.onnx")


def test_swap_into_place_rechecks_and_restores_the_earlier_output(tmp_path: Path) -> None:
    """A file a user drops into an earlier fit output while a new fit runs is not deleted by the swap."""
    from tleg_deploy.deploy.fit import _staged
    from tleg_deploy.deploy.fit_types import FIT_FORMAT
    from tleg_deploy.errors import OutputError

    out = tmp_path / "fit-out"
    out.mkdir()
    earlier = json.dumps({"format": FIT_FORMAT})
    (out / "plan.json").write_text(earlier)
    with pytest.raises(OutputError, match="notes.txt"), _staged(out) as staging:
        (staging / "plan.json").write_text(json.dumps({"format": FIT_FORMAT, "new": True}))
        (out / "notes.txt").write_text("mine")  # the user, meanwhile
    assert (out / "notes.txt").read_text() == "mine" and (out / "plan.json").read_text() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-out"]  # no staging or .old directory left
    with _staged(out) as staging:  # without the user's file the swap happens
        (out / "notes.txt").unlink()
        (staging / "plan.json").write_text("{}")
    assert (out / "plan.json").read_text() == "{}"
