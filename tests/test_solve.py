"""The solver on synthetic (but real) DeviceProfiles built from points, and the budget parser."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tleg_deploy.errors import DeviceError, InfeasibleError, TlegError, UnitError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan import costs
from tleg_deploy.plan.solve import Budget, Plan, load_accuracy_table, solve
from tleg_deploy.plan.units import parse_percentile
from tleg_deploy.profile.table import DeviceProfile, Point, make_entry

SPEC = ViTSpec.preset("digits")


def profile(lines: dict[str, tuple[float, float, float, float]], *, name: str = "synth",
            depths: tuple[int, ...] = (1, 6, 12), source: str = "measured") -> DeviceProfile:
    """``lines[precision] = (latency intercept ms, slope ms/block, memory intercept MB, slope MB/block)``;
    p90 = 1.1 x p50; points lie exactly on the lines, so the upper bound is the profile's relative floor."""
    entries = []
    for precision, (a, b, ma, mb) in lines.items():
        pts = [Point(depth=d, p50_ms=a + b * d, p90_ms=1.1 * (a + b * d), p99_ms=1.2 * (a + b * d), mean_ms=a + b * d,
                     std_ms=0.01, n=50, rounds=5, p50_se_ms=0.0, p90_se_ms=0.0, memory_mb=ma + mb * d) for d in depths]
        entries.append(make_entry(SPEC, precision, 1, pts))
    return DeviceProfile(name=name, source=source, kind="cpu", backend="onnxruntime",
                         measure_command="tleg-deploy profile --device host", entries=tuple(entries))


FP32 = (0.5, 0.4, 10.0, 2.0)
INT8 = (0.3, 0.25, 8.0, 1.0)


def brute_force(prof: DeviceProfile, budget: Budget, max_depth: int, margin: float = 0.0, *,
                depths: tuple[int, ...] = (), precisions: tuple[str, ...] = ()) -> tuple[int, str]:
    """The deepest fitting (depth, precision) by scanning everything (or ``depths`` x ``precisions``);
    ties to the higher precision."""
    best = (0, "")
    for precision in precisions or prof.precisions(SPEC):
        for d in depths or range(1, max_depth + 1):
            p = prof.predict(d, spec=SPEC, precision=precision)
            lat = p.latency_p90_upper_ms if budget.percentile == "p90" else p.latency_p50_upper_ms
            ok = (budget.latency_ms is None or lat <= budget.latency_ms * (1 - margin)) and \
                 (budget.memory_mb is None or p.memory_upper_mb <= budget.memory_mb * (1 - margin)) and \
                 (budget.params is None or costs.params(SPEC, d) <= budget.params)
            if ok and d > best[0]:
                best = (d, precision)
    return best


def test_feasible_pick_is_deepest_that_fits_with_confidence() -> None:
    prof = profile({"fp32": FP32})
    plan = solve(prof, Budget(latency_ms=5.0), spec=SPEC, max_depth=48)
    assert isinstance(plan, Plan)
    # upper p90 = 1.03 * 1.1 * (0.5 + 0.4 d) <= 5  ->  d <= 9.78
    assert (plan.depth, plan.precision) == (9, "fp32")
    assert plan.pick.latency_upper_ms <= 5.0 < plan.deeper[0].latency_upper_ms
    assert plan.pick.latency_ms < plan.pick.latency_upper_ms  # the interval is used, not the point estimate
    assert plan.binding == "latency" and "depth 10 does not fit" in plan.why_not_deeper
    assert 0 <= plan.margins["latency"] < 0.1
    assert plan.pick.params == costs.params(SPEC, 9) and plan.pick.macs == costs.macs(SPEC, 9)
    assert any(c.depth == 10 and not c.fits for c in plan.candidates)
    d = plan.to_dict()
    assert d["format"] == "tleg-plan" and d["depth"] == 9 and d["pick"]["fits"] is True


@pytest.mark.parametrize("latency", [1.0, 2.2, 3.7, 5.0, 8.8, 13.0, 21.5])
@pytest.mark.parametrize("memory", [None, 25.0, 60.0])
def test_matches_brute_force(latency: float, memory: float | None) -> None:
    prof = profile({"fp32": FP32, "int8": INT8})
    budget = Budget(latency_ms=latency, memory_mb=memory)
    expected = brute_force(prof, budget, 40)
    if expected[0] == 0:
        with pytest.raises(InfeasibleError):
            solve(prof, budget, spec=SPEC, max_depth=40)
        return
    plan = solve(prof, budget, spec=SPEC, max_depth=40)
    assert (plan.depth, plan.precision) == expected


def test_infeasible_names_cheapest_option_and_budget() -> None:
    prof = profile({"fp32": FP32, "int8": INT8})
    with pytest.raises(InfeasibleError) as e:
        solve(prof, Budget(latency_ms=0.2), spec=SPEC)
    msg = str(e.value)
    assert "depth 1 int8" in msg and "0.2 ms" in msg and "p90 latency 0.623 ms" in msg  # 1.03*1.1*0.55


def test_binding_memory_vs_latency() -> None:
    prof = profile({"fp32": FP32})
    by_latency = solve(prof, Budget(latency_ms=5.0, memory_mb=1000.0), spec=SPEC)
    by_memory = solve(prof, Budget(latency_ms=5.0, memory_mb=20.0), spec=SPEC)
    assert by_latency.binding == "latency" and by_latency.depth == 9
    # memory upper = 1.05 * (10 + 2 d) <= 20  ->  d <= 4.52
    assert by_memory.binding == "memory" and by_memory.depth == 4
    assert "MB" in by_memory.why_not_deeper
    by_params = solve(prof, Budget(params=costs.params(SPEC, 3)), spec=SPEC)
    assert by_params.depth == 3 and by_params.binding == "params" and by_params.margins["params"] == 0.0


def test_precision_choice_and_ties() -> None:
    prof = profile({"fp32": FP32, "int8": INT8})
    plan = solve(prof, Budget(latency_ms=5.0), spec=SPEC)
    assert plan.precision == "int8" and plan.depth > 9  # int8 only when it buys depth
    assert {c.precision for c in plan.deeper} == {"fp32", "int8"}
    # A tie: int8 as fast as fp32 -> the higher precision wins.
    tie = profile({"int8": FP32, "fp32": FP32})
    assert solve(tie, Budget(latency_ms=5.0), spec=SPEC).precision == "fp32"
    only = solve(prof, Budget(latency_ms=5.0), spec=SPEC, precisions=["fp32"])
    assert (only.depth, only.precision) == (9, "fp32")
    with pytest.raises(DeviceError, match="fp16"):
        solve(prof, Budget(latency_ms=5.0), spec=SPEC, precisions=["fp16"])
    # The artifact-size budget favours int8 (1 byte/param).
    size = solve(prof, Budget(artifact_bytes=costs.artifact_bytes(SPEC, 5, "fp32")), spec=SPEC)
    assert size.precision == "int8" and size.depth > 5


def test_margin_tightens() -> None:
    prof = profile({"fp32": FP32})
    loose = solve(prof, Budget(latency_ms=8.0), spec=SPEC)
    tight = solve(prof, Budget(latency_ms=8.0), spec=SPEC, margin=0.25)
    assert tight.depth < loose.depth
    assert tight.pick.latency_upper_ms <= 0.75 * 8.0
    assert (tight.depth, tight.precision) == brute_force(prof, Budget(latency_ms=8.0), 48, margin=0.25)
    with pytest.raises(UnitError):
        solve(prof, Budget(latency_ms=8.0), spec=SPEC, margin=1.5)


def test_percentile_p50_is_looser_than_p90() -> None:
    prof = profile({"fp32": FP32})
    p50 = solve(prof, Budget(latency_ms=8.0, percentile="p50"), spec=SPEC)
    p90 = solve(prof, Budget(latency_ms=8.0), spec=SPEC)
    assert p50.depth > p90.depth and p50.pick.latency_upper_ms < p90.deeper[0].latency_upper_ms * 1.2


def test_accuracy_objective_may_pick_shallower() -> None:
    prof = profile({"fp32": FP32})
    peaked = {2: 0.80, 4: 0.90, 6: 0.93, 8: 0.92, 12: 0.95}
    plan = solve(prof, Budget(latency_ms=5.0), spec=SPEC, objective="accuracy", accuracy=peaked)
    assert plan.depth == 6 and plan.pick.accuracy == 0.93  # 9 fits, but 8 (the deepest covered) is worse
    assert plan.binding == "accuracy"
    plan = solve(prof, Budget(latency_ms=20.0), spec=SPEC, objective="accuracy", accuracy=peaked)
    assert plan.depth == 12
    with pytest.raises(TlegError, match="accuracy"):
        solve(prof, Budget(latency_ms=5.0), spec=SPEC, objective="accuracy")
    with pytest.raises(InfeasibleError, match="accuracy table"):
        solve(prof, Budget(latency_ms=5.0), spec=SPEC, objective="accuracy", accuracy={12: 0.9})


def test_extrapolation_and_estimated_are_flagged() -> None:
    prof = profile({"fp32": FP32}, source="estimated")
    inside = solve(prof, Budget(latency_ms=5.0), spec=SPEC)
    assert not inside.pick.extrapolated
    far = solve(prof, Budget(latency_ms=15.0), spec=SPEC)
    assert far.depth > 12 and far.pick.extrapolated
    assert any("extrapolated" in w for w in far.warnings) and any("estimated" in w for w in far.warnings)
    assert far.measure_command == "tleg-deploy profile --device host"


def test_max_depth_bounds_the_search() -> None:
    prof = profile({"fp32": FP32})
    plan = solve(prof, Budget(latency_ms=1000.0), spec=SPEC, max_depth=16)
    assert plan.depth == 16 and plan.binding == "max_depth" and plan.deeper == ()


def test_several_profiles_are_alternatives() -> None:
    slow = profile({"fp32": FP32}, name="slow")
    fast = profile({"fp32": (0.2, 0.2, 10.0, 2.0)}, name="fast")
    plan = solve([slow, fast], Budget(latency_ms=5.0), spec=SPEC)
    assert plan.device == "fast" and plan.depth > 9


def test_profile_without_the_spec_is_a_device_error() -> None:
    prof = profile({"fp32": FP32})
    with pytest.raises(DeviceError, match="measure it"):
        solve(prof, Budget(latency_ms=5.0), spec=ViTSpec.preset("deit-tiny"))


def test_budget_validation() -> None:
    with pytest.raises(UnitError, match="no limit"):
        Budget()
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(UnitError):
            Budget(latency_ms=bad)
    with pytest.raises(UnitError, match="percentile"):
        Budget(latency_ms=5.0, percentile="p99")
    b = Budget.from_strings(latency="0.5s", memory="1.5GiB", params="20M", percentile="50", artifact="4MB")
    assert (b.latency_ms, b.percentile, b.params, b.artifact_bytes) == (500.0, "p50", 20_000_000, 4_000_000)
    assert b.memory_mb == pytest.approx(1.5 * 1024**3 / 1e6)
    assert "p50 500 ms" in b.describe() or "p50 500.0 ms" in b.describe()


@pytest.mark.parametrize("bad", ["5parsecs", "-1ms", "0ms", "inf", "nan", "5", "ms"])
def test_budget_strings_reject_nonsense(bad: str) -> None:
    with pytest.raises(UnitError):
        Budget.from_strings(latency=bad)


@pytest.mark.parametrize("bad", ["5parsecs", "-1MB", "0MB", "inf", "nan"])
def test_size_and_count_reject_nonsense(bad: str) -> None:
    with pytest.raises(UnitError):
        Budget.from_strings(memory=bad)
    with pytest.raises(UnitError):
        Budget.from_strings(params=bad.replace("MB", "M"))


def test_parse_percentile() -> None:
    assert parse_percentile("P90") == "p90" and parse_percentile("50") == "p50"
    for bad in ("p99", "median", ""):
        with pytest.raises(UnitError):
            parse_percentile(bad)


def test_accuracy_table_files(tmp_path: Path) -> None:
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"2": 0.5, "6": 0.75}))
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({"accuracy": {"tleg": {"3": {"mean": 0.6, "std": 0.01, "runs": [0.6]}}}}))
    assert load_accuracy_table(flat) == {2: 0.5, 6: 0.75}
    assert load_accuracy_table(claims) == {3: 0.6}
    with pytest.raises(TlegError, match="scratch"):
        load_accuracy_table(claims, init="scratch")
    with pytest.raises(TlegError, match="no accuracy table"):
        load_accuracy_table(tmp_path / "missing.json")


def test_solver_and_profile_table_are_torch_free() -> None:
    # `fit --device jetson` reaches the solver without torch: fit.py and the fit command import it lazily.
    code = ("import sys, tleg_deploy.plan.solve, tleg_deploy.profile.table, tleg_deploy.plan.units, "
            "tleg_deploy.deploy.fit; "
            "import tleg_deploy.profile.registry; "
            "print('torch' in sys.modules, 'onnxruntime' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False False"


def test_wide_interval_where_depth_1_does_not_fit_but_deeper_does() -> None:
    # Nearly flat latency measured only at depths 6..8 with noisy rounds: the 95% upper bound is
    # widest far from the measured depths, so depth 1 can cost "more" than depth 7.
    pts = [Point(depth=d, p50_ms=1.0 + 0.001 * d, p90_ms=1.1 + 0.001 * d, p99_ms=1.3, mean_ms=1.0, std_ms=0.1, n=20,
                 rounds=3, p50_se_ms=0.05, p90_se_ms=0.05, memory_mb=10.0 + d) for d in (6, 7, 8)]
    prof = DeviceProfile(name="flat", source="measured", kind="cpu", backend="onnxruntime", measure_command="m",
                         entries=(make_entry(SPEC, "fp32", 1, pts),))
    up = {d: prof.predict(d, spec=SPEC, precision="fp32").latency_p90_upper_ms for d in range(1, 17)}
    assert up[1] > up[7]
    budget = Budget(latency_ms=(up[1] + max(up[7], up[8])) / 2)
    plan = solve(prof, budget, spec=SPEC, max_depth=16)
    assert (plan.depth, plan.precision) == brute_force(prof, budget, 16)
    assert plan.depth > 7


@pytest.mark.parametrize("bad", [1.5, -3, 72.1, float("nan")])
def test_accuracy_tables_must_hold_fractions(tmp_path: Path, bad: float) -> None:
    with pytest.raises(TlegError, match="accuracy table value"):
        solve(profile({"fp32": FP32}), Budget(latency_ms=5.0), spec=SPEC, objective="accuracy", accuracy={4: bad})
    path = tmp_path / "acc.json"
    path.write_text(json.dumps({"2": 0.5, "4": bad}))
    with pytest.raises(TlegError, match="4"):
        load_accuracy_table(path)


def test_cli_default_accuracy_table_is_this_checkouts_benchmark_result() -> None:
    from tleg_deploy.cli.fit import DEFAULT_ACCURACY

    table = load_accuracy_table(Path(__file__).resolve().parents[1] / DEFAULT_ACCURACY)
    assert table and all(0.0 <= a <= 1.0 for a in table.values())


def _exact_profile(points: dict[int, float], rel_floor: float) -> DeviceProfile:
    pts = [Point(depth=d, p50_ms=ms, p90_ms=ms, p99_ms=ms, mean_ms=ms, std_ms=0.0, n=50, rounds=5, p50_se_ms=0.0,
                 p90_se_ms=0.0, memory_mb=10.0 + d) for d, ms in points.items()]
    return DeviceProfile(name="edge", source="measured", kind="cpu", backend="onnxruntime", measure_command="m",
                         entries=(make_entry(SPEC, "fp32", 1, pts, latency_rel_floor=rel_floor),))


def test_fitting_depths_below_the_measured_range_need_not_be_one_run() -> None:
    # Depths 6/7/8 at 40 + d ms, a 5% floor that widens below depth 6: depths 1, 2 and 6 fit 48.35 ms,
    # 3..5 do not. Binary search from depth 1 used to answer 2.
    prof = _exact_profile({6: 46.0, 7: 47.0, 8: 48.0}, 0.05)
    budget = Budget(latency_ms=48.35)
    fits = [d for d in range(1, 13) if prof.predict(d, spec=SPEC, precision="fp32").latency_p90_upper_ms <= 48.35]
    assert fits == [1, 2, 6]
    assert brute_force(prof, budget, 48) == (6, "fp32")
    assert solve(prof, budget, spec=SPEC, max_depth=48).depth == 6
    plan = solve(prof, budget, spec=SPEC, max_depth=48, objective="accuracy", accuracy={3: 0.9, 4: 0.95, 6: 0.8})
    assert plan.depth == 6  # 3 and 4 score higher but do not fit


def _random_profile(rng: random.Random) -> DeviceProfile:
    """Random measured depths (often excluding 1), noisy points around a rising line, wide or narrow
    intervals, one to three precisions. A third of the entries are "edge" ones like the test above:
    exact points and a relative floor whose widening below the measured depths outweighs the line's
    rise, so the upper bound first rises, then falls towards the measured range."""
    entries = []
    for precision in rng.sample(["fp32", "fp16", "int8"], rng.randint(1, 3)):
        while True:
            depths = sorted(rng.sample(range(rng.choice([1, 2, 4, 8, 8]), 25), rng.randint(2, 5)))
            floor = rng.choice([0.0, 0.03, 0.2, 0.5])
            a, b = rng.uniform(0.0, 50.0), rng.uniform(0.0, 3.0)
            ma, mb = rng.uniform(1.0, 100.0), rng.uniform(0.0, 5.0)
            noise, se = rng.choice([0.0, 0.01, 0.2]), rng.choice([0.0, 0.05, 2.0])
            if depths[0] >= 3 and rng.random() < 0.7:  # edge: the floor's peak lies in (1, first measured depth)
                floor, noise, se, b = rng.choice([0.02, 0.05, 0.1]), 0.0, 0.0, max(b, 0.1)
                span, peak = depths[-1] - depths[0], rng.uniform((1 + depths[0]) / 2, depths[0] - 0.5)
                # upper(d) = (a + b d)(1 + floor (1 + (d0 - d) / span)) peaks at d = (span + d0 - a/b + span/floor) / 2
                a = b * (span + depths[0] + span / floor - 2 * peak)
            pts = [Point(depth=d, p50_ms=max(0.0, a + b * d + rng.gauss(0, noise * (a + b * d + 1))),
                         p90_ms=max(0.0, 1.2 * (a + b * d) + rng.gauss(0, noise * (a + b * d + 1))),
                         p99_ms=2 * (a + b * d), mean_ms=a + b * d, std_ms=0.1, n=20, rounds=rng.randint(1, 6),
                         p50_se_ms=se, p90_se_ms=2 * se, memory_mb=max(0.0, ma + mb * d + rng.gauss(0, noise * ma)))
                   for d in depths]
            entry = make_entry(SPEC, precision, 1, pts, latency_rel_floor=floor,
                               memory_rel_floor=rng.choice([0.0, 0.05, 0.3]))
            f = entry.fit
            if min(f.latency_p50.slope, f.latency_p90.slope, f.memory.slope) >= 0:  # falling ones are refused
                break
        entries.append(entry)
    return DeviceProfile(name="random", source="measured", kind="cpu", backend="onnxruntime", measure_command="m",
                         entries=tuple(entries))


def _runs(prof: DeviceProfile, budget: Budget, max_depth: int) -> int:
    """The most separate runs of fitting depths any precision has (the old solver assumed one)."""
    most = 0
    for precision in prof.precisions(SPEC):
        fits = [brute_force(prof, budget, 0, depths=(d,), precisions=(precision,))[0] == d
                for d in range(1, max_depth + 1)]
        most = max(most, sum(1 for i, f in enumerate(fits) if f and (i == 0 or not fits[i - 1])))
    return most


def test_solver_matches_brute_force_on_random_profiles() -> None:
    rng = random.Random(20240611)
    checked = split_runs = 0
    for _ in range(400):
        prof = _random_profile(rng)
        max_depth = rng.choice([1, 5, 12, 24, 48, 64])
        # Budgets around the cost of a random depth; half of the time at or just below the measured range,
        # and often exactly that depth's upper bound (where a run can be split in two).
        entry = rng.choice(prof.entries)
        d_ref = rng.randint(1, max_depth) if rng.random() < 0.5 else min(entry.depths[0], max_depth)
        p = prof.predict(d_ref, spec=SPEC, precision=entry.precision)
        scale = rng.choice([rng.uniform(0.8, 1.2), rng.uniform(0.999, 1.001), 1.0])
        budget = Budget(latency_ms=p.latency_p90_upper_ms * scale or 1.0,
                        memory_mb=rng.choice([None, None, p.memory_upper_mb * rng.uniform(0.9, 1.5) or 1.0]),
                        params=rng.choice([None, None, costs.params(SPEC, rng.randint(1, 64))]))
        expected = brute_force(prof, budget, max_depth)
        if expected[0] == 0:
            with pytest.raises(InfeasibleError):
                solve(prof, budget, spec=SPEC, max_depth=max_depth)
            continue
        plan = solve(prof, budget, spec=SPEC, max_depth=max_depth)
        assert (plan.depth, plan.precision) == expected, (prof, budget, max_depth)
        checked += 1
        split_runs += _runs(prof, budget, max_depth) > 1
    assert checked > 250 and split_runs > 20, (checked, split_runs)  # the budgets do reach the tricky region
