"""Estimated profiles answer for any spec (computed from the datasheets, cached, labelled estimated, with a
measurement hint naming the spec), and the search depth defaults to what the learngene supports."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.spec_text import parse_spec, parse_specs
from tleg_deploy.plan.budget import Budget
from tleg_deploy.plan.solve import default_max_depth, depth_notes, solve
from tleg_deploy.profile import registry

CUSTOM = parse_spec("digits,img_size=32,patch_size=4,in_chans=3,num_classes=10")
runner = CliRunner()


def test_estimated_profile_answers_for_a_custom_spec(isolated: Path) -> None:
    shipped = registry.resolve_profile("jetson")
    assert not shipped.precisions(CUSTOM)
    prof = registry.resolve_profile("jetson", spec=CUSTOM)
    assert prof.source == "estimated" and prof.precisions(CUSTOM) == ("fp16", "int8")
    for precision in ("fp16", "int8"):
        lat = [prof.predict(d, spec=CUSTOM, precision=precision).latency_p50_ms for d in (1, 6, 12, 24, 48)]
        assert lat[0] > 0 and all(b > a for a, b in zip(lat, lat[1:], strict=False)), lat
    # The hint names the spec in a form `profile --spec` parses back.
    cmd = prof.measure_command
    assert "--spec digits,img_size=32,patch_size=4,in_chans=3" in cmd
    assert parse_specs(cmd.split("--spec ")[1].split()[0]) == [CUSTOM]
    assert prof.measure_command in (registry.estimate_notice(prof) or "")


def test_cached_and_reused(isolated: Path, monkeypatch) -> None:
    first = registry.resolve_profile("jetson", spec=CUSTOM)
    files = list((isolated / "cache").glob("estimated-jetson-orin-nano-*.json"))
    assert len(files) == 1
    from tleg_deploy.profile import estimate

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite the cache")

    monkeypatch.setattr(estimate, "estimate_entry", boom)
    assert registry.resolve_profile("jetson", spec=CUSTOM) == first
    # Another spec is another cache file (and is computed: here, it hits the patched estimator).
    with pytest.raises(AssertionError, match="recomputed"):
        registry.resolve_profile("jetson", spec=dataclasses.replace(CUSTOM, num_classes=5))


def test_agrees_with_the_shipped_entries(isolated: Path) -> None:
    """A preset computed on the fly equals the shipped entry: same datasheets, same calibration."""
    shipped = registry.resolve_profile("jetson")
    digits = ViTSpec.preset("digits")
    stripped = dataclasses.replace(shipped, entries=tuple(e for e in shipped.entries if e.spec != digits))
    again = registry.estimated_for_spec(stripped, digits)
    for precision in ("fp16", "int8"):
        for d in (1, 12, 48):
            a = shipped.predict(d, spec=digits, precision=precision)
            b = again.predict(d, spec=digits, precision=precision)
            assert b.latency_p50_ms == pytest.approx(a.latency_p50_ms, rel=1e-6)
            assert b.memory_mb == pytest.approx(a.memory_mb, rel=1e-6)


def test_a_measured_profile_is_not_extended(isolated: Path) -> None:
    prof = registry.resolve_profile("jetson")
    measured = dataclasses.replace(prof, source="measured")
    assert registry.for_spec(measured, CUSTOM) is measured


def test_solver_path_stays_torch_free(isolated: Path) -> None:
    import subprocess

    code = ("import sys; from tleg_deploy.model.spec_text import parse_spec; "
            "from tleg_deploy.profile.registry import resolve_profile; "
            "from tleg_deploy.plan.solve import solve; from tleg_deploy.plan.budget import Budget; "
            "s = parse_spec('digits,img_size=32,in_chans=3'); p = resolve_profile('jetson', spec=s); "
            "solve(p, Budget(latency_ms=5.0), spec=s); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.stdout.strip() == "False"


# -- depth beyond the learngene --------------------------------------------------------------------
def test_default_max_depth() -> None:
    assert default_max_depth(12) == 24
    assert default_max_depth(3000) == 4096
    assert default_max_depth(12, {2: 0.5, 6: 0.7, 9: 0.8}) == 9  # the table bounds the search
    assert default_max_depth() == 48
    assert depth_notes(12, 12) == [] and depth_notes(30, 12, {30: 0.9}) == []
    (note,) = depth_notes(24, 12)
    assert "deeper than the learngene's Aux-Net depth 12" in note and "not measured" in note


def test_solve_bounds_by_the_accuracy_table(isolated: Path) -> None:
    prof = registry.resolve_profile("jetson")
    digits = ViTSpec.preset("digits")
    plan = solve(prof, Budget(latency_ms=1000.0), spec=digits, accuracy={1: 0.5, 7: 0.9})
    assert plan.depth == 7 and plan.max_depth == 7
    assert solve(prof, Budget(latency_ms=1000.0), spec=digits).max_depth == 48


def test_fit_defaults_and_notes_on_a_custom_learngene(isolated: Path) -> None:
    """A learngene of a custom spec (not in the shipped profile) fits on jetson; the search stops at twice
    its Aux-Net depth, and the pick says its accuracy is not measured (CLI, plan.json, REPORT.md)."""
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.spec_text import spec_arg

    spec = parse_spec("img_size=8,patch_size=4,in_chans=3,embed_dim=16,num_heads=2,mlp_ratio=2,num_classes=10")
    lg_path = isolated / "lg.safetensors"
    Learngene.init(spec, aux_depth=4, seed=0).save(lg_path)
    res = runner.invoke(app, ["fit", "--device", "jetson", "--latency", "50ms", "--learngene", str(lg_path),
                              "-o", str(isolated / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "pick: depth 8" in text and "(max_depth 8)" in text
    assert "deeper than the learngene's Aux-Net depth 4" in text
    assert f"--spec {spec_arg(spec)} " in text  # the hint names the learngene's spec
    plan = json.loads((isolated / "out" / "plan.json").read_text())
    assert plan["plan"]["max_depth"] == 8 and any("not measured" in n for n in plan["notes"])
    assert "not measured" in (isolated / "out" / "REPORT.md").read_text()
    # --max-depth within the Aux-Net depth: no note.
    res = runner.invoke(app, ["fit", "--device", "jetson", "--latency", "50ms", "--learngene", str(lg_path),
                              "--max-depth", "3", "-o", str(isolated / "out3"), "--quiet", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["depth"] == 3 and not any("not measured" in n for n in data["notes"])
