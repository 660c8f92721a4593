"""The torch-free cost model: fitting, leave-one-out, prediction intervals, JSON round trip, tampering."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tleg_deploy.errors import DepthError, DeviceError, FormatError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile import table as table_module
from tleg_deploy.profile.linefit import fit_line, t975
from tleg_deploy.profile.table import DeviceProfile, Point, make_entry

SPEC = ViTSpec.preset("digits")


def _point(depth: int, ms: float, *, se: float = 0.01, mem: float | None = None) -> Point:
    return Point(depth=depth, p50_ms=ms, p90_ms=ms * 1.1, p99_ms=ms * 1.3, mean_ms=ms * 1.02, std_ms=ms * 0.05,
                 n=50, rounds=5, p50_se_ms=se, p90_se_ms=se * 2, memory_mb=mem if mem is not None else 10 + depth)


def _profile(points: list[Point], precision: str = "fp32") -> DeviceProfile:
    entry = make_entry(SPEC, precision, 1, points)
    return DeviceProfile(name="testbox", aliases=("tb",), source="measured", kind="cpu", backend="onnxruntime",
                         measure_command="tleg-deploy profile --device host", entries=(entry,),
                         hardware={"cores": {"value": 2, "unit": "", "source": "os.cpu_count()"}},
                         runtime={"threads": 1}, date="2026-01-01")


def test_exact_line_recovers_coefficients() -> None:
    f = fit_line([1, 6, 12], [0.5 + 0.25 * d for d in (1, 6, 12)])
    assert f.intercept == pytest.approx(0.5)
    assert f.slope == pytest.approx(0.25)
    assert f.r2 == pytest.approx(1.0)
    assert f.worst_residual == pytest.approx(0.0, abs=1e-12)
    assert f.loo_error_rel == pytest.approx(0.0, abs=1e-12)


def test_noisy_line_diagnostics() -> None:
    depths = [1, 4, 8, 12, 16]
    noise = [0.02, -0.03, 0.01, 0.03, -0.02]
    values = [1.0 + 0.5 * d + e for d, e in zip(depths, noise, strict=True)]
    f = fit_line(depths, values)
    assert 0.99 < f.r2 < 1.0
    assert f.worst_residual == pytest.approx(max(abs(v - f.value(d)) for d, v in zip(depths, values, strict=True)))
    assert f.slope == pytest.approx(0.5, abs=0.01)
    assert f.resid_std > 0


def test_leave_one_out_flags_an_outlier() -> None:
    """Leave-one-out error is small for a clean line and large when one point is off the line."""
    clean = fit_line([1, 6, 12, 18], [1.0, 3.5, 6.5, 9.5])
    bent = fit_line([1, 6, 12, 18], [1.0, 3.5, 6.5, 14.0])
    assert clean.loo_error_rel < 1e-9
    assert bent.loo_error_rel > 0.2
    # Hand-computed: drop depth 18 -> the line through the other three predicts 9.5 at 18.
    a = fit_line([1, 6, 12], [1.0, 3.5, 6.5])
    assert bent.loo_error_rel >= abs(14.0 - a.value(18)) / 14.0 - 1e-12


def test_interval_widens_when_extrapolating_and_has_a_floor() -> None:
    prof = _profile([_point(1, 1.0), _point(8, 4.5), _point(16, 8.5)])
    inside = prof.predict(8, spec=SPEC, precision="fp32")
    far = prof.predict(200, spec=SPEC, precision="fp32")
    assert not inside.extrapolated
    assert far.extrapolated and prof.predict(17, spec=SPEC, precision="fp32").extrapolated
    w_in = (inside.latency_p50_upper_ms - inside.latency_p50_ms) / inside.latency_p50_ms
    w_far = (far.latency_p50_upper_ms - far.latency_p50_ms) / far.latency_p50_ms
    assert w_far > w_in
    # Three exactly collinear points still give a non-zero interval (noise and relative floor).
    assert inside.latency_p50_upper_ms > inside.latency_p50_ms * 1.02
    assert inside.latency_p90_ms > inside.latency_p50_ms
    assert inside.memory_upper_mb > inside.memory_mb == pytest.approx(18.0)


def test_noisier_measurements_give_wider_intervals() -> None:
    quiet = _profile([_point(d, 1 + 0.5 * d, se=0.001) for d in (1, 8, 16)])
    noisy = _profile([_point(d, 1 + 0.5 * d, se=0.5) for d in (1, 8, 16)])
    q = quiet.predict(12, spec=SPEC, precision="fp32")
    n = noisy.predict(12, spec=SPEC, precision="fp32")
    assert n.latency_p50_upper_ms > q.latency_p50_upper_ms
    assert n.latency_p50_ms == pytest.approx(q.latency_p50_ms)


def test_t_quantile() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(10) == pytest.approx(2.228)
    assert t975(1000) == pytest.approx(1.962, abs=2e-3)
    assert t975(30) > t975(31) > t975(1e9) > 1.95


def test_predict_errors() -> None:
    prof = _profile([_point(1, 1.0), _point(8, 4.5), _point(16, 8.5)])
    assert prof.precisions(SPEC) == ("fp32",)
    assert prof.precisions(SPEC, batch=4) == ()
    assert prof.precisions(ViTSpec.preset("deit-tiny")) == ()
    with pytest.raises(DeviceError, match="int8"):
        prof.predict(4, spec=SPEC, precision="int8")
    with pytest.raises(DeviceError, match="batch 8"):
        prof.predict(4, spec=SPEC, precision="fp32", batch=8)
    with pytest.raises(DepthError):
        prof.predict(0, spec=SPEC, precision="fp32")
    with pytest.raises(DepthError):
        prof.predict(5000, spec=SPEC, precision="fp32")
    with pytest.raises(FormatError, match="2 distinct depths"):
        make_entry(SPEC, "fp32", 1, [_point(4, 1.0)])


def test_json_round_trip(tmp_path) -> None:
    prof = _profile([_point(1, 1.0), _point(8, 4.6), _point(16, 8.4)])
    path = prof.save(tmp_path / "p.json")
    again = DeviceProfile.load(path)
    assert again == prof
    assert again.predict(30, spec=SPEC, precision="fp32") == prof.predict(30, spec=SPEC, precision="fp32")
    data = json.loads(path.read_text())
    assert data["format"] == "tleg-device-profile" and data["schema_version"] == 2
    assert data["entries"][0]["spec_name"] == "digits"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.update(format="other"), "format"),
        (lambda d: d.pop("entries"), "entries"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d["device"].update(kind="toaster"), "device.kind"),
        (lambda d: d["runtime"].update(backend="tflite"), "runtime.backend"),
        (lambda d: d["device"]["hardware"]["cores"].pop("source"), "device.hardware.cores"),
        (lambda d: d["entries"][0].update(precision="fp8"), "entries[0].precision"),
        (lambda d: d["entries"][0]["points"][1].update(p50_ms="fast"), "entries[0].points[1].p50_ms"),
        (lambda d: d["entries"][0]["points"][1].update(p50_ms=-1.0), "entries[0].points[1].p50_ms"),
        (lambda d: d["entries"][0]["fit"]["latency_p50_ms"].update(slope=0.001), "latency_p50_ms.slope"),
        (lambda d: d["entries"][0]["points"][2].update(p90_ms=99.0), "latency_p90_ms"),
        (lambda d: d["entries"][0]["spec"].update(embed_dim=63), "entries[0].spec"),
        (lambda d: d["entries"][0].update(spec_name="deit-base"), "entries[0].spec_name"),
    ],
)
def test_tampered_json_names_the_field(tmp_path, edit, field) -> None:
    prof = _profile([_point(1, 1.0), _point(8, 4.6), _point(16, 8.4)])
    data = prof.to_dict()
    edit(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=field.replace("[", r"\[").replace("]", r"\]")):
        DeviceProfile.load(path)


def test_not_json(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        DeviceProfile.load(path)
    with pytest.raises(DeviceError, match="does not exist"):
        DeviceProfile.load(tmp_path / "missing.json")


def test_table_is_torch_free() -> None:
    code = ("import sys, tleg_deploy.profile.table, tleg_deploy.profile, tleg_deploy.profile.registry; "
            "bad = [m for m in ('torch', 'onnxruntime', 'numpy') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prediction_is_linear_in_depth() -> None:
    prof = _profile([_point(1, 1.0), _point(8, 4.6), _point(16, 8.4)])
    p = [prof.predict(d, spec=SPEC, precision="fp32").latency_p50_ms for d in (2, 3, 4)]
    assert math.isclose(p[1] - p[0], p[2] - p[1], rel_tol=1e-9)


@pytest.mark.parametrize(("cost", "points"), [
    ("p50 latency", [_point(2, 5.0), _point(8, 4.0), _point(16, 3.0)]),
    ("memory", [_point(2, 1.0, mem=30.0), _point(8, 4.0, mem=20.0), _point(16, 8.0, mem=12.0)]),
])
def test_profile_whose_cost_falls_with_depth_is_refused(tmp_path, cost: str, points: list[Point]) -> None:
    good = _profile([_point(1, 1.0), _point(8, 4.6), _point(16, 8.4)])
    data = good.to_dict()
    falling = make_entry(SPEC, "fp32", 1, points)  # as a measurement or an edit could produce it
    data["entries"][0] = table_module._entry_to_dict(falling)
    path = tmp_path / "falling.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FormatError, match=rf"falling.json: profile 'testbox' entries\[0\] \(digits fp32, batch 1\): "
                                          rf"{cost} falls with depth .* over the measured points depth 2: .*depth 16"):
        DeviceProfile.load(path)
    with pytest.raises(FormatError, match="falls with depth"):
        good.with_entries([falling])
    # A flat cost (e.g. memory dominated by the runtime) is not falling.
    flat = [_point(d, 1.0 + d, mem=50.0) for d in (1, 6, 12)]
    assert good.with_entries([make_entry(SPEC, "fp32", 1, flat)]).entries[0].fit.memory.slope == pytest.approx(0)


def test_shipped_profiles_still_load() -> None:
    from pathlib import Path

    import tleg_deploy

    shipped = sorted((Path(tleg_deploy.__file__).parent / "profiles").glob("*.json"))
    shipped += sorted((Path(tleg_deploy.__file__).parents[1] / "profiles").glob("*.json"))
    assert len(shipped) >= 4
    for path in shipped:
        prof = DeviceProfile.load(path)
        for e in prof.entries:
            assert min(e.fit.latency_p50.slope, e.fit.latency_p90.slope, e.fit.memory.slope) >= 0, path


def test_monotone_from_is_where_upper_bounds_stop_falling() -> None:
    # Three exact points far from depth 1 and a wide relative floor: below the measured depths the
    # widening interval makes shallower depths cost *more* than deeper ones.
    pts = [Point(depth=d, p50_ms=40.0 + d, p90_ms=40.0 + d, p99_ms=40.0 + d, mean_ms=40.0 + d, std_ms=0.0, n=50,
                 rounds=5, p50_se_ms=0.0, p90_se_ms=0.0, memory_mb=10.0 + d) for d in (6, 7, 8)]
    prof = _profile(pts).with_entries([make_entry(SPEC, "fp32", 1, pts, latency_rel_floor=0.05)])
    start = prof.monotone_from(SPEC, "fp32")
    upper = [prof.predict(d, spec=SPEC, precision="fp32").latency_p90_upper_ms for d in range(1, 49)]
    assert upper[1] < upper[3]  # depth 2 is cheaper than depth 4: not one run
    assert all(a <= b + 1e-12 for a, b in zip(upper[start - 1:], upper[start:], strict=False))


def test_upper_bound_never_falls_from_nondecreasing_from() -> None:
    import random

    rng = random.Random(7)
    tight = 0
    for _ in range(300):
        depths = sorted(rng.sample(range(1, 30), rng.randint(2, 6)))
        a, b = rng.uniform(-5.0, 50.0), rng.choice([0.0, rng.uniform(0.0, 0.05), rng.uniform(0.0, 3.0)])
        values = [max(0.0, a + b * d + rng.gauss(0, rng.choice([0.0, 0.5, 5.0]))) for d in depths]
        fit = fit_line(depths, values, noise_std=rng.choice([0.0, 0.1, 3.0]), noise_dof=rng.choice([0, 4, 20]),
                       rel_floor=rng.choice([0.0, 0.03, 0.3]))
        start = fit.nondecreasing_from()
        if math.isinf(start):
            assert fit.slope < 0
            continue
        first = max(1, math.ceil(start))
        up = [fit.upper(d) for d in range(first, 200)]
        assert all(x <= y * (1 + 1e-12) + 1e-12 for x, y in zip(up, up[1:], strict=False)), (depths, values, fit)
        tight += first > 1 and fit.upper(first - 1) > fit.upper(first)  # the bound is not just "from 1"
    assert tight > 20
