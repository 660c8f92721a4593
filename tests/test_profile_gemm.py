"""The physical limit (profile.gemm): 1-thread GEMM MAC/s on this host, and the MAC floor of a
measured latency in fit's REPORT.md. No wall-clock asserts: rates are finite and positive."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan import costs
from tleg_deploy.profile.gemm import GEMM_KEYS, GemmRate, gemm_facts, mac_floor, measure_gemm
from tleg_deploy.profile.table import DeviceProfile

RATE = GemmRate(fp32_macs=40e9, int8_macs=160e9, shape=(197, 384, 1536), runs=100)


def test_measured_gemm_rates_are_finite_and_positive() -> None:
    rate = measure_gemm((17, 64, 256), round_seconds=0.01, rounds=3)
    assert math.isfinite(rate.fp32_macs) and rate.fp32_macs > 1e6
    assert math.isfinite(rate.int8_macs) and rate.int8_macs > 1e6
    # int8 has no reason to be far slower than fp32 (a sanity bound, not a speed claim).
    assert rate.int8_macs >= 0.05 * rate.fp32_macs
    assert rate.runs >= 9 and rate.shape == (17, 64, 256)


def test_mac_floor_uses_the_precision_s_rate_and_threads() -> None:
    hw = gemm_facts(RATE)
    fp = mac_floor(hw, 4_000_000_000, "fp32", 200.0)
    assert fp is not None and fp.floor_ms == pytest.approx(100.0) and fp.fraction == pytest.approx(0.5)
    q = mac_floor(hw, 4_000_000_000, "int8-qdq", 100.0, threads=2)
    assert q is not None and q.rate_macs == pytest.approx(320e9) and q.fraction == pytest.approx(0.125)
    assert "MAC floor 100 ms = 50.0% of the measured 200 ms" in fp.describe()
    assert mac_floor({}, 1000, "fp32", 1.0) is None  # a profile without the figure
    assert mac_floor(hw, 1000, "fp32", math.nan) is None
    assert mac_floor({GEMM_KEYS["fp32"]: {"value": math.inf, "unit": "MAC/s", "source": "x"}}, 1000, "fp32",
                     1.0) is None


def _report(hardware: dict, measured: bool) -> tuple[str, ViTSpec, float]:
    from tleg_deploy.deploy.fit_report import render_report
    from tleg_deploy.deploy.fit_types import FitResult
    from tleg_deploy.plan.solve import Budget, solve
    from tleg_deploy.profile.artifact import Measurement
    from tleg_deploy.profile.registry import resolve_profile

    spec = ViTSpec.preset("digits")
    prof = resolve_profile("jetson", spec=spec)
    plan = solve(prof, Budget(latency_ms=1.0), spec=spec, max_depth=6, precisions=("int8",))
    prof = dataclasses.replace(prof, hardware={**prof.hardware, **hardware})
    m = Measurement(depth=plan.depth, precision="int8", p50_ms=0.5, p90_ms=0.6, runs=50, threads=1)
    res = FitResult(plan=plan, pick=plan.pick, out_dir=Path("x"), files=(), measured=m if measured else None)
    floor_ms = costs.macs(spec, plan.depth) / RATE.int8_macs * 1e3
    return render_report(res, prof, "depth/model.onnx"), spec, floor_ms


def test_report_shows_the_fraction_of_the_mac_floor() -> None:
    report, _, floor_ms = _report(gemm_facts(RATE), measured=True)
    line = next(la for la in report.splitlines() if "MAC floor" in la)
    assert f"MAC floor {floor_ms:.3g} ms = {floor_ms / 0.5:.1%} of the measured 0.5 ms" in line
    assert "160 GMAC/s" in line and "int8 GEMM" in line


def test_report_says_nothing_without_the_figure_or_a_measurement() -> None:
    assert "MAC floor" not in _report({}, measured=True)[0]
    assert "MAC floor" not in _report(gemm_facts(RATE), measured=False)[0]


def test_old_profiles_without_the_figure_still_load(tmp_path: Path) -> None:
    from tleg_deploy.profile.registry import resolve_profile

    prof = resolve_profile("jetson", spec=ViTSpec.preset("digits"))
    assert not set(GEMM_KEYS.values()) & set(prof.hardware)
    again = DeviceProfile.load(prof.save(tmp_path / "old.json"))
    assert again.hardware == prof.hardware
    with_rate = DeviceProfile.load(dataclasses.replace(prof, hardware={**prof.hardware, **gemm_facts(RATE)})
                                   .save(tmp_path / "new.json"))
    assert with_rate.hardware[GEMM_KEYS["int8"]]["value"] == pytest.approx(160e9)
