"""fit's measured loop (``deploy.fit_measure.measured_check``): steps down over budget, up while the next deeper depth
still measures within budget and meets the other budgets; bounded. Measurements are injected per depth."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tleg_deploy.deploy import fit as fit_mod
from tleg_deploy.deploy import fit_measure
from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
from tleg_deploy.errors import BackendError, InfeasibleError
from tleg_deploy.model.resources import load_learngene
from tleg_deploy.plan.solve import Budget, Plan, evaluate, solve
from tleg_deploy.profile import artifact
from tleg_deploy.profile.artifact import Measurement
from tleg_deploy.profile.registry import resolve_profile
from tleg_deploy.profile.table import DeviceProfile

LIMIT = 2.0  # ms, the latency budget of every test here (jetson int8 picks depth 5)


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[int], float]], list[int]]:
    """Make the loop's timing return ``latency(depth)`` ms (p50 and p90) without exporting; returns the
    depths measured, in order."""

    def install(latency: Callable[[int], float]) -> list[int]:
        calls: list[int] = []

        def fake_measure(path: object, spec: object, *, depth: int, precision: str, threads: int = 1,
                         **_k: object) -> Measurement:
            calls.append(depth)
            ms = latency(depth)
            return Measurement(depth=depth, precision=precision, p50_ms=ms, p90_ms=ms, runs=10, threads=threads)

        monkeypatch.setattr(artifact, "measure_onnx", fake_measure)
        monkeypatch.setattr(fit_measure, "_timing_file", lambda model, precision, out: out / "model.onnx")
        return calls

    return install


def _setup(budget: Budget, max_depth: int = 12) -> tuple[FitRequest, Plan, DeviceProfile]:
    lg = load_learngene("demo")
    prof = resolve_profile("jetson", spec=lg.spec)
    search = SearchOptions(max_depth=max_depth, precisions=("int8",))
    plan = solve(prof, budget, spec=lg.spec, max_depth=max_depth, precisions=("int8",))
    return FitRequest(budget, device=prof, out_dir=Path("unused"), search=search), plan, prof


def _check(request: FitRequest, plan: Plan, prof: DeviceProfile, tmp_path: Path,
           say: Callable[[str], None] = lambda _m: None) -> tuple[int, Measurement | None, list[str], dict[int, float]]:
    timer = fit_measure.host_timer(load_learngene("demo"), plan, prof, tmp_path, say)
    return fit_measure.measured_check(request, plan, prof, LIMIT, timer, say)


def test_steps_up_while_the_deeper_depth_measures_within_budget(tmp_path: Path, measured: Callable) -> None:
    request, plan, prof = _setup(Budget(latency_ms=LIMIT))
    d = plan.depth
    calls = measured(lambda depth: 0.5 if depth <= d + 2 else 2.4)
    depth, m, steps, over = _check(request, plan, prof, tmp_path)
    assert depth == d + 2 and m is not None and m.p90_ms == 0.5 and calls == [d, d + 1, d + 2, d + 3]
    assert [s.rsplit(": ", 1)[1] for s in steps] == [f"stepped up to depth {d + 1}", f"stepped up to depth {d + 2}",
                                                     f"stays at depth {d + 2}"]
    pred = evaluate(prof, request.budget, spec=plan.spec, depth=d + 1, precision="int8")
    assert steps[0].startswith(f"depth {d + 1} predicted p90 {pred.latency_ms:.3g} ms")
    assert "measured 0.5 ms <= 2 ms" in steps[0]
    assert "measured 2.4 ms > 2 ms" in steps[2] and over == {d + 3: 2.4}


def test_step_up_is_bounded_by_max_steps_and_max_depth(tmp_path: Path, measured: Callable) -> None:
    request, plan, prof = _setup(Budget(latency_ms=LIMIT))
    d = plan.depth
    calls = measured(lambda _depth: 0.1)  # everything fits when measured
    depth, _, steps, over = _check(request, plan, prof, tmp_path)
    assert depth == d + request.max_steps == d + 3 and len(steps) == 3 and over == {}
    assert calls == [d, d + 1, d + 2, d + 3]

    request, plan, prof = _setup(Budget(latency_ms=LIMIT), max_depth=d + 1)
    calls = measured(lambda _depth: 0.1)
    depth, _, steps, _ = _check(request, plan, prof, tmp_path)
    assert plan.max_depth == d + 1 and depth == d + 1 and calls == [d, d + 1] and len(steps) == 1


def test_steps_down_over_budget_and_then_never_up(tmp_path: Path, measured: Callable) -> None:
    request, plan, prof = _setup(Budget(latency_ms=LIMIT))
    d = plan.depth
    calls = measured(lambda depth: 3.0 if depth >= d - 1 else 1.9)
    depth, m, steps, over = _check(request, plan, prof, tmp_path)
    assert depth == d - 2 and m is not None and m.p90_ms == 1.9 and calls == [d, d - 1, d - 2]
    assert steps[0].endswith(f"stepped to depth {d - 1}") and "measured 3 ms > 2 ms" in steps[0]
    assert over == {d: 3.0, d - 1: 3.0}

    calls = measured(lambda _depth: 5.0)  # still over after max_steps: refused, naming the last depth
    with pytest.raises(InfeasibleError, match=f"depth {d - 3} int8 measured p90 5 ms over"):
        _check(request, plan, prof, tmp_path)
    assert calls == [d, d - 1, d - 2, d - 3]


def test_step_up_never_breaks_a_memory_budget(tmp_path: Path, measured: Callable) -> None:
    lg = load_learngene("demo")
    prof = resolve_profile("jetson", spec=lg.spec)
    mem = {d: evaluate(prof, Budget(latency_ms=LIMIT), spec=lg.spec, depth=d, precision="int8").memory_upper_mb
           for d in (3, 4)}
    assert mem[3] < mem[4]
    request, plan, prof = _setup(Budget(latency_ms=1000.0, memory_mb=(mem[3] + mem[4]) / 2))
    assert plan.depth == 3 and plan.binding == "memory"
    calls = measured(lambda _depth: 0.01)
    said: list[str] = []
    timer = fit_measure.host_timer(lg, plan, prof, tmp_path, said.append)
    depth, _, steps, _ = fit_measure.measured_check(request, plan, prof, 1000.0, timer, said.append)
    assert depth == 3 and steps == [] and calls == [3]
    assert any(m.startswith("not stepping up to depth 4: memory") for m in said)


def test_a_non_finite_measurement_is_an_error(tmp_path: Path, measured: Callable) -> None:
    request, plan, prof = _setup(Budget(latency_ms=LIMIT))
    measured(lambda _depth: float("nan"))
    with pytest.raises(BackendError, match="not a latency"):
        _check(request, plan, prof, tmp_path)


def test_fit_records_the_steps_up_in_plan_json_and_report(
    tmp_path: Path, measured: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end with the loop forced on (a jetson profile, as if it ran here): what was built is the
    stepped-up depth, and plan.json and REPORT.md say each step, predicted vs measured."""
    from tleg_deploy.deploy.fit import fit

    monkeypatch.setattr(fit_mod, "_runs_here", lambda _profile: True)
    monkeypatch.setattr(fit_measure, "_timing_file", lambda model, precision, out: out / "model.onnx")
    lg = load_learngene("demo")
    prof = resolve_profile("jetson", spec=lg.spec)
    plan = solve(prof, Budget(latency_ms=LIMIT), spec=lg.spec, max_depth=12, precisions=("int8",))
    d = plan.depth
    measured(lambda depth: 0.5 if depth <= d + 1 else 2.5)
    out = tmp_path / "out"
    res = fit(FitRequest(Budget(latency_ms=LIMIT), device=prof, out_dir=out,
                         search=SearchOptions(max_depth=12, precisions=("int8",))))
    assert res.depth == d + 1 and res.plan.depth == d and res.figures == "measured"
    doc = json.loads((out / "plan.json").read_text())
    assert doc["depth"] == d + 1 and doc["measured"]["p90_ms"] == 0.5 and doc["measured_over_budget"] == {
        str(d + 2): 2.5}
    assert doc["steps"][0].endswith(f"stepped up to depth {d + 1}") and "predicted p90" in doc["steps"][0]
    report = (out / "REPORT.md").read_text()
    assert f"- Measured step: depth {d + 1} predicted" in report and f"stepped up to depth {d + 1}" in report
    assert f"stays at depth {d + 1}" in report
    assert next(la for la in report.splitlines() if la.startswith(f"| {d} | int8 |")).endswith("| yes |")
    assert "measured p90 2.5 ms > 2 ms" in next(la for la in report.splitlines() if la.startswith(f"| {d + 2} |"))
