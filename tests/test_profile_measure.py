"""Real (tiny, quick) measurements, the fvcore attention handle, and the roofline estimates."""

from __future__ import annotations

import pytest

from tleg_deploy.errors import BackendError, DepthError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan import costs
from tleg_deploy.profile.config import MeasureConfig
from tleg_deploy.profile.estimate import (
    calibrate_efficiency,
    estimate_entry,
    fvcore_macs,
    load_datasheets,
)
from tleg_deploy.profile.measure import profile
from tleg_deploy.profile.runners import require_backend
from tleg_deploy.profile.table import DeviceProfile


@pytest.fixture
def small_spec() -> ViTSpec:
    # Wide enough that a block costs more than ORT's per-call overhead, still milliseconds at depth 16.
    return ViTSpec(img_size=16, patch_size=4, in_chans=3, embed_dim=64, num_heads=4, mlp_ratio=4.0, num_classes=10)


@pytest.mark.parametrize("name", ["deit-tiny", "digits"])
def test_fvcore_with_sdpa_handle_matches_analytic_macs(name: str) -> None:
    spec = ViTSpec.preset(name)
    block, fixed = fvcore_macs(spec)
    assert block == costs.block_macs(spec)
    assert fixed == costs.fixed_macs(spec)
    # Attention is a real share of the block: without the handle the count would be short by 2·N²·D.
    assert block - spec.num_tokens * (4 * spec.embed_dim**2 + 2 * spec.embed_dim * spec.mlp_hidden) == (
        2 * spec.num_tokens**2 * spec.embed_dim)


def test_fvcore_counts_batch_and_class_token() -> None:
    spec = ViTSpec(img_size=8, patch_size=4, in_chans=3, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=5,
                   class_token=True)
    block, fixed = fvcore_macs(spec, batch=3)
    assert block == 3 * costs.block_macs(spec)
    assert fixed == 3 * costs.fixed_macs(spec)


@pytest.mark.slow
def test_real_onnxruntime_measurement_is_linear(small_spec: ViTSpec, tmp_path) -> None:
    cfg = MeasureConfig(depths=(1, 8, 16), rounds=3, extra_rounds=2, round_seconds=0.05, max_reps=60, memory=True,
                        probe=False, retries=0)  # the drift probe: test_profile_drift.py; re-measures: below
    prof = profile(small_spec, name="testhost", config=cfg)
    entry = prof.entries[0]
    assert [p.depth for p in entry.points] == [1, 8, 16]
    p50 = [p.p50_ms for p in entry.points]
    assert p50[0] < p50[1] < p50[2]
    assert entry.fit.latency_p50.r2 > 0.9
    assert entry.fit.latency_p50.slope > 0
    mem = [p.memory_mb for p in entry.points]
    assert mem[2] > mem[0] > 0  # deeper models hold more weights
    for p in entry.points:
        assert p.p50_ms <= p.p90_ms <= p.p99_ms and p.n >= 3 * 3 and 3 <= p.rounds <= 5
    assert prof.runtime["threads"] == 1
    assert prof.runtime["options"]["session.intra_op.allow_spinning"] == "0"
    assert prof.environment["cpu"] and prof.environment["libraries"]["onnxruntime"]
    # The host's 1-thread GEMM rates are recorded as hardware facts (profile.gemm) and survive a round trip.
    for key in ("gemm_fp32_macs_1t", "gemm_int8_macs_1t"):
        assert prof.hardware[key]["unit"] == "MAC/s" and prof.hardware[key]["value"] > 0
    # Round trip of a real profile, and a prediction inside the measured range.
    again = DeviceProfile.load(prof.save(tmp_path / "testhost.json"))
    assert again.hardware == prof.hardware
    pred = again.predict(12, spec=small_spec, precision="fp32")
    assert not pred.extrapolated and p50[1] < pred.latency_p50_ms < p50[2] * 1.2


def test_measure_config_rejects_bad_input() -> None:
    with pytest.raises(BackendError, match="unknown backend"):
        MeasureConfig(backend="tflite")
    with pytest.raises(BackendError, match="threads"):
        MeasureConfig(threads=0)
    with pytest.raises(BackendError, match="2 distinct depths"):
        MeasureConfig(depths=(4, 4))
    with pytest.raises(DepthError):
        MeasureConfig(depths=(1, 5000))
    with pytest.raises(BackendError, match="precision"):
        MeasureConfig(precisions=("fp8",))
    with pytest.raises(BackendError, match="GPU"):
        MeasureConfig(backend="tensorrt", device="cpu")


def test_missing_backend_says_what_to_install() -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match="pip install"):
            require_backend("tensorrt", "cuda")
    else:
        pytest.skip("tensorrt is installed here")


def test_calibration_and_estimates_are_consistent() -> None:
    sheets = load_datasheets()
    eff = calibrate_efficiency(sheets)["value"]
    assert 0.05 < eff < 1.0  # a fraction of the datasheet peak
    spec = ViTSpec.preset("deit-small")
    macs = fvcore_macs(spec)
    nano = estimate_entry("jetson-orin-nano", spec, "fp16", sheets=sheets, macs=macs)
    agx = estimate_entry("jetson-agx-orin", spec, "fp16", sheets=sheets, macs=macs)
    nano_int8 = estimate_entry("jetson-orin-nano", spec, "int8", sheets=sheets, macs=macs)
    assert nano.fit.latency_p50.slope > agx.fit.latency_p50.slope  # the smaller module is slower per block
    assert nano_int8.fit.latency_p50.slope < nano.fit.latency_p50.slope  # int8 helps, ...
    assert nano_int8.fit.latency_p50.slope > nano.fit.latency_p50.slope / 2.5  # ... but less than the peak ratio
    assert nano_int8.fit.memory.slope == pytest.approx(nano.fit.memory.slope / 2)  # 1 vs 2 bytes per weight
    assert nano.basis is not None and nano.basis["macs_per_block"] == costs.block_macs(spec)


def test_calibration_flops_come_from_fvcore_and_match_the_analytic_oracle() -> None:
    sheets = load_datasheets()
    cal = calibrate_efficiency(sheets)
    for point, p in zip(cal["points"], sheets["calibration"]["points"], strict=True):
        spec = ViTSpec(**p["spec"])  # OWL-ViT: class token, 768 px
        block, fixed = fvcore_macs(spec)
        assert point["flops"] == 2 * (fixed + p["depth"] * block) == 2 * costs.macs(spec, p["depth"])


def test_shipped_profiles_are_estimated_and_cite_sources() -> None:
    from tleg_deploy.profile.registry import SHIPPED_DIR

    names = {p.stem for p in SHIPPED_DIR.glob("*.json")}
    assert {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "h100"} <= names
    for name in names:
        prof = DeviceProfile.load(SHIPPED_DIR / f"{name}.json")
        assert prof.source == "estimated" and prof.backend == "tensorrt"
        assert prof.measure_command.startswith(f"tleg-deploy profile --device {name} --backend tensorrt")
        for fact in prof.hardware.values():
            assert fact["source"].strip()
        for spec_name in ("deit-tiny", "deit-small", "deit-base", "digits"):
            assert prof.precisions(ViTSpec.preset(spec_name)) == ("fp16", "int8")
        tiny = prof.predict(12, spec=ViTSpec.preset("deit-tiny"), precision="fp16")
        base = prof.predict(12, spec=ViTSpec.preset("deit-base"), precision="fp16")
        assert base.latency_p50_ms > tiny.latency_p50_ms and base.memory_mb > tiny.memory_mb
        assert tiny.latency_p50_upper_ms > tiny.latency_p50_ms * 1.2  # an estimate is not sure of itself


@pytest.mark.slow
def test_shipped_profiles_are_what_the_estimator_computes() -> None:
    """The shipped JSON comes from ``python -m tleg_deploy.profile.estimate``, not from hand edits, and
    goes stale (this fails) when the datasheet figures or the roofline change without regenerating it."""
    from tleg_deploy.profile.estimate import estimate_profile
    from tleg_deploy.profile.registry import SHIPPED_DIR

    for path in SHIPPED_DIR.glob("*.json"):
        shipped = DeviceProfile.load(path)
        fresh = estimate_profile(path.stem)
        for spec_name in ("deit-tiny", "digits"):
            spec = ViTSpec.preset(spec_name)
            for precision in shipped.precisions(spec):
                for depth in (1, 12, 30):
                    a = shipped.predict(depth, spec=spec, precision=precision)
                    b = fresh.predict(depth, spec=spec, precision=precision)
                    assert a.latency_p90_upper_ms == pytest.approx(b.latency_p90_upper_ms, rel=1e-9), path.stem
                    assert a.memory_mb == pytest.approx(b.memory_mb, rel=1e-9), path.stem


def test_memory_probe_runs_the_installed_module_with_this_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from tleg_deploy.profile import memory

    calls: list[tuple[list[str], dict]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append((cmd, kwargs))
        return subprocess.CompletedProcess(cmd, 0, stdout='{"peak_mb": 12.5}\n', stderr="")

    monkeypatch.setattr(memory.subprocess, "run", fake_run)
    spec = ViTSpec.preset("digits")
    assert memory.peak_memory_mb(MeasureConfig(), spec, 2, "fp32", "x.onnx") == 12.5
    (cmd, kwargs), = calls
    assert cmd[:3] == [sys.executable, "-m", "tleg_deploy.profile.memory"] and "env" not in kwargs

    def too_slow(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.TimeoutExpired(cmd, 1)

    monkeypatch.setattr(memory.subprocess, "run", too_slow)
    with pytest.raises(BackendError, match="ran over"):
        memory.peak_memory_mb(MeasureConfig(), spec, 2, "fp32", "x.onnx")


def _session(p50: dict[int, float]) -> list:
    from tleg_deploy.profile.table import Point

    return [Point(depth=d, p50_ms=v, p90_ms=v, p99_ms=v, mean_ms=v, std_ms=0.0, n=10, rounds=5, p50_se_ms=0.0,
                  p90_se_ms=0.0, memory_mb=10.0 + d) for d, v in p50.items()]


CURVED = {1: 0.038, 6: 0.190, 12: 0.431}  # an Intel Xeon's digits model: depth 1 sits 25% off the line


@pytest.mark.parametrize("sessions, kept, measured, reproduced", [
    # a curve that the second session repeats (8% slower throughout: the machine's speed moved, not its curve) is
    # the machine's own: no third session
    ([CURVED, {1: 0.038 * 1.08, 6: 0.190 * 1.08, 12: 0.431 * 1.09}, None], 0, 2, True),
    # a burst: the second session differs and is not linear either, so a third is measured
    ([CURVED, {1: 0.060, 6: 0.19, 12: 0.431}, {1: 0.02, 6: 0.12, 12: 0.24}], 2, 3, False),
    # the re-measured session is linear: kept
    ([CURVED, {1: 0.02, 6: 0.12, 12: 0.24}, None], 1, 2, False),
])
def test_a_curve_that_reproduces_ends_the_retries(monkeypatch: pytest.MonkeyPatch, sessions, kept, measured,
                                                  reproduced) -> None:
    from tleg_deploy.profile import measure

    calls: list[bool] = []

    def fake(spec, cfg, precision, **kw):  # type: ignore[no-untyped-def]
        calls.append(cfg.memory)
        points = _session(sessions[len(calls) - 1])
        return points if cfg.memory else [p.__class__(**{**p.__dict__, "memory_mb": 1.0}) for p in points]

    monkeypatch.setattr(measure, "measure_points", fake)
    cfg = MeasureConfig(retries=2)
    points, rejected, again = measure._linear_session(ViTSpec.preset("digits"), cfg, "fp32", None,
                                                      lambda m, f: None)
    assert len(calls) == measured and again is reproduced
    assert calls == [True] + [False] * (measured - 1)  # peak memory is measured in the first session only
    assert [p.p50_ms for p in points] == list(sessions[kept].values())
    assert [p.memory_mb for p in points] == [11.0, 16.0, 22.0] and len(rejected) == measured - 1


def test_the_kit_runner_stops_retrying_on_a_curve_that_reproduces(monkeypatch: pytest.MonkeyPatch) -> None:
    from tleg_deploy.profile import kit_runner

    medians = iter([CURVED, {d: v * 0.93 for d, v in CURVED.items()}, {1: 0.02, 6: 0.2, 12: 0.42}])
    monkeypatch.setattr(kit_runner, "Runner", lambda *a: None)
    monkeypatch.setattr(kit_runner, "time_rounds", lambda runners, p: {d: [[v]] for d, v in next(medians).items()})
    monkeypatch.setattr(kit_runner, "log", lambda msg: None)
    kit = {"protocol": {"retries": 2, "linear_tolerance": 0.03}, "batch": 1, "threads": 1,
           "spec": {"in_chans": 1, "img_size": 8},
           "artifacts": [{"depth": d, "precision": "fp32", "file": f"d{d}.onnx"} for d in CURVED]}
    out = kit_runner.measure_precision("/nonexistent", kit, "fp32")
    assert len(out["rejected"]) == 1 and next(medians) == {1: 0.02, 6: 0.2, 12: 0.42}  # the third never ran
