"""The drift probe: the reference a measured profile records, the reading before use (rescaled beyond
the threshold, stated otherwise), old and estimated profiles, the widened interval, the conditions."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tleg_deploy.errors import FormatError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan.solve import Budget, solve
from tleg_deploy.profile import drift, env
from tleg_deploy.profile.drift import DRIFT_THRESHOLD, ProbeInfo, ProbeProtocol, ProbeSample
from tleg_deploy.profile.table import DeviceProfile, Point, make_entry

SPEC = ViTSpec.preset("digits")


def _point(depth: int, ms: float) -> Point:
    return Point(depth=depth, p50_ms=ms, p90_ms=ms * 1.1, p99_ms=ms * 1.3, mean_ms=ms, std_ms=ms * 0.05, n=50,
                 rounds=5, p50_se_ms=0.002, p90_se_ms=0.004, memory_mb=10 + depth)


def _info(p50s: tuple[float, ...] = (1.0, 1.0, 1.0), round_rel_std: float = 0.0) -> ProbeInfo:
    history = tuple(ProbeSample(phase=f"p{i}", elapsed_s=float(i), p50_ms=v, se_ms=0.01,
                                conditions={"load_average": [0.5, 0.5, 0.5]}) for i, v in enumerate(p50s))
    return ProbeInfo(spec=SPEC, precision="fp32", batch=1, depth=6, backend="onnxruntime", device="cpu",
                     protocol=ProbeProtocol(), history=history, round_rel_std=round_rel_std)


def _profile(*, probe: ProbeInfo | None = None, source: str = "measured", here: bool = True) -> DeviceProfile:
    entry = make_entry(SPEC, "fp32", 1, [_point(d, 0.1 + 0.05 * d) for d in (1, 6, 12)])
    return DeviceProfile(name="host", source=source, kind="cpu", backend="onnxruntime",
                         measure_command="tleg-deploy profile --device host", entries=(entry,),
                         runtime={"threads": 1}, date="2026-01-01", probe=probe,
                         host_fingerprint=env.host_fingerprint() if here else "0123456789abcdef")


def _never(_info: ProbeInfo) -> tuple[float, float]:
    raise AssertionError("this profile must not be timed")


def test_probe_round_trips_and_old_profiles_load() -> None:
    prof = _profile(probe=_info((1.0, 1.1, 0.9), round_rel_std=0.01))
    data = json.loads(json.dumps(prof.to_dict()))
    assert data["schema_version"] == 2 and data["probe"]["reference_p50_ms"] == pytest.approx(1.0)
    again = DeviceProfile.from_dict(data)
    assert again.probe == prof.probe
    # A version-1 file (no probe key) still loads, without a probe; a v1 file with a probe key is refused.
    old = {k: v for k, v in data.items() if k != "probe"} | {"schema_version": 1}
    assert DeviceProfile.from_dict(old).probe is None
    with pytest.raises(FormatError, match="probe"):
        DeviceProfile.from_dict(data | {"schema_version": 1})
    edited = json.loads(json.dumps(data))
    edited["probe"]["reference_p50_ms"] = 0.5
    with pytest.raises(FormatError, match="reference_p50_ms"):
        DeviceProfile.from_dict(edited)


def test_old_measured_profile_says_the_probe_is_unavailable() -> None:
    reading = drift.probe(_profile(probe=None), prober=_never)
    assert reading.status == "unavailable" and reading.scale == 1.0 and "unavailable" in reading.message


def test_estimated_and_other_host_profiles_are_not_timed() -> None:
    est = drift.probe(_profile(probe=_info(), source="estimated"), prober=_never)
    assert est.status == "not-probed" and est.ratio is None
    other = drift.probe(_profile(probe=_info(), here=False), prober=_never)
    assert other.status == "other-host" and "another host" in other.message


def test_drift_beyond_threshold_rescales_latency_only() -> None:
    prof = _profile(probe=_info())
    reading = drift.probe(prof, prober=lambda info: (1.3, 0.0))
    assert reading.status == "rescaled" and reading.drift == pytest.approx(0.3)
    assert "+30.0%" in reading.message and "rescaled" in reading.message
    fixed = drift.apply(prof, reading)
    before, after = prof.predict(9, spec=SPEC, precision="fp32"), fixed.predict(9, spec=SPEC, precision="fp32")
    assert after.latency_p50_ms == pytest.approx(1.3 * before.latency_p50_ms)
    assert after.latency_p90_ms == pytest.approx(1.3 * before.latency_p90_ms)
    assert after.latency_p50_upper_ms > before.latency_p50_upper_ms
    assert after.memory_mb == before.memory_mb and after.memory_upper_mb == before.memory_upper_mb
    # A reading changes no measured number: saving keeps them, with the reading recorded as a use.
    saved, measured = fixed.to_dict(), prof.to_dict()
    uses = saved["probe"].pop("uses")
    assert [u["p50_ms"] for u in uses] == [1.3] and measured["probe"].pop("uses") == []
    for d in (saved, measured):
        d["probe"].pop("variation_rel")
    assert saved == measured


def test_uses_that_find_the_machine_moving_widen_the_intervals_and_are_saved(tmp_path) -> None:
    """The profiling-time variation is what 15 quiet seconds showed; probes at later uses that find the machine
    moved (±8% from one use to the next here) widen every interval from then on, and travel with the file."""
    prof = _profile(probe=_info())
    quiet = prof.probe.variation_rel
    for ratio in (1.0, 1.08, 1.0, 1.08):
        prof = drift.apply(prof, drift.probe(prof, prober=lambda info, r=ratio: (r * info.reference_p50_ms, 0.0)))
    info = prof.probe
    assert len(info.uses) == 4 and info.reference_p50_ms == _info().reference_p50_ms  # the reference stays
    # successive log ratios 0, L, -L, L from the reference: rms = L·√(3/4), one probe's share / √2
    assert info.use_variation_rel == pytest.approx(math.log(1.08) * math.sqrt(3 / 8), rel=1e-9)
    assert info.variation_rel == info.use_variation_rel > quiet
    steady = _profile(probe=_info())
    for _ in range(4):  # a machine as fast at every use as when profiled: nothing widens
        steady = drift.apply(steady, drift.probe(steady, prober=lambda info: (info.reference_p50_ms, 0.0)))
    assert steady.probe.variation_rel == quiet
    wide = prof.predict(9, spec=SPEC, precision="fp32")
    narrow = steady.predict(9, spec=SPEC, precision="fp32")
    assert wide.latency_p50_upper_ms - wide.latency_p50_ms > narrow.latency_p50_upper_ms - narrow.latency_p50_ms
    loaded = DeviceProfile.load(prof.save(tmp_path / "p.json"))
    assert loaded.probe == info and loaded.probe.variation_rel == info.variation_rel
    for _ in range(drift.MAX_USES + 5):
        prof = drift.apply(prof, drift.probe(prof, prober=lambda info: (info.reference_p50_ms, 0.0)))
    assert len(prof.probe.uses) == drift.MAX_USES


def test_drift_within_threshold_is_stated_not_applied_but_widens() -> None:
    prof = _profile(probe=_info())
    small = 1 + DRIFT_THRESHOLD / 2
    reading = drift.probe(prof, prober=lambda info: (small, 0.0))
    assert reading.status == "within" and reading.scale == 1.0 and reading.drift == pytest.approx(small - 1)
    fixed = drift.apply(prof, reading)
    a, b = prof.predict(9, spec=SPEC, precision="fp32"), fixed.predict(9, spec=SPEC, precision="fp32")
    assert b.latency_p50_ms == a.latency_p50_ms and b.latency_p50_upper_ms > a.latency_p50_upper_ms


def test_failed_probe_leaves_predictions_alone() -> None:
    def broken(_info: ProbeInfo) -> tuple[float, float]:
        raise RuntimeError("no runtime")

    reading = drift.probe(_profile(probe=_info()), prober=broken)
    assert reading.status == "failed" and reading.scale == 1.0 and "RuntimeError" in reading.message


def test_interval_widens_with_the_recorded_variation() -> None:
    without = _profile(probe=None).predict(9, spec=SPEC, precision="fp32")
    calm = _profile(probe=_info((1.0, 1.0, 1.0))).predict(9, spec=SPEC, precision="fp32")
    wild = _profile(probe=_info((0.8, 1.0, 1.25))).predict(9, spec=SPEC, precision="fp32")
    assert without.latency_p50_ms == calm.latency_p50_ms == wild.latency_p50_ms
    assert without.latency_p50_upper_ms < calm.latency_p50_upper_ms < wild.latency_p50_upper_ms
    assert _info((1.0, 1.0)).variation_rel == drift.MIN_VARIATION
    assert _info((1.0, 1.0), round_rel_std=0.07).variation_rel == pytest.approx(0.07)
    assert _info((0.8, 1.0, 1.25)).variation_rel > 0.15
    # Upper bounds stay non-decreasing from where the profile says (the solver relies on it).
    prof = _profile(probe=_info((0.8, 1.0, 1.25)))
    start = prof.monotone_from(SPEC, "fp32")
    uppers = [prof.predict(d, spec=SPEC, precision="fp32").latency_p90_upper_ms for d in range(start, 40)]
    assert uppers == sorted(uppers)


def test_solve_states_the_drift_and_plan_records_it() -> None:
    prof = _profile(probe=_info())
    fixed = drift.apply(prof, drift.probe(prof, prober=lambda info: (1.5, 0.0)))
    plain = solve(prof, Budget(latency_ms=1.0), spec=SPEC)
    plan = solve(fixed, Budget(latency_ms=1.0), spec=SPEC)
    assert plan.depth < plain.depth  # a slower machine now affords fewer blocks
    assert plan.drift is not None and plan.drift["status"] == "rescaled" and plan.drift["drift"] == pytest.approx(0.5)
    assert any("drift probe" in w for w in plan.warnings)
    assert plan.to_dict()["drift"]["scale"] == pytest.approx(1.5)
    assert plain.to_dict()["drift"] is None


def test_conditions_are_recorded() -> None:
    c = env.conditions()
    assert set(c) >= {"time", "load_average", "cpuinfo_mhz", "scaling_cur_freq_mhz", "cores"}
    assert "cpu_mhz" in env.environment(1)


@pytest.mark.slow
def test_measured_profile_records_probe_history_and_can_be_probed(tiny_spec: ViTSpec) -> None:
    from tleg_deploy.profile.measure import MeasureConfig, profile

    cfg = MeasureConfig(depths=(1, 4, 8), rounds=3, extra_rounds=0, round_seconds=0.03, max_reps=30, memory=False,
                        retries=0, gemm=False)
    prof = profile(tiny_spec, name="testhost", config=cfg)
    assert not any(k.startswith("gemm_") for k in prof.hardware)  # gemm=False: not measured
    info = prof.probe
    assert info is not None and info.depth == 4 and info.precision == "fp32" and info.spec == tiny_spec
    phases = [s.phase for s in info.history]
    assert phases[0] == "start" and phases[-1] == "after fp32" and len(phases) == 3  # start, mid-session, end
    assert all(s.p50_ms > 0 and "load_average" in s.conditions for s in info.history)
    assert "cpu_mhz" in prof.environment
    reading = drift.probe(prof)
    assert reading.status in ("rescaled", "within") and reading.ratio is not None and reading.ratio > 0
    off = profile(tiny_spec, name="testhost", config=dataclasses.replace(cfg, probe=False))
    assert off.probe is None


def test_uses_are_kept_in_the_host_cache_and_never_in_a_users_file(isolated) -> None:
    from tleg_deploy.profile import registry

    cached = _profile(probe=_info())
    cache_file = cached.save(registry._host_path())
    users = cached.save(isolated / "my-host.json")
    before = users.read_bytes()
    used = drift.apply(cached, drift.probe(cached, prober=lambda info: (1.2, 0.0)))
    registry.remember_probe(used)
    assert [u.p50_ms for u in DeviceProfile.load(cache_file).probe.uses] == [1.2]
    assert users.read_bytes() == before  # the same measurement in a file of the user's: untouched
    # a cache re-measured since the profile was read (another date) is not overwritten with old uses
    dataclasses.replace(cached, date="2026-02-02").save(cache_file)
    registry.remember_probe(drift.apply(used, drift.probe(used, prober=lambda info: (1.3, 0.0))))
    assert DeviceProfile.load(cache_file).probe.uses == ()
    other = dataclasses.replace(used, name="lab-box")  # not the host cache's profile
    registry.remember_probe(other)
    assert DeviceProfile.load(cache_file).probe.uses == ()
