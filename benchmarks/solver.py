"""Does the solver's pick fit when measured, and is it tight? (issue 6)

On this host, ONNX Runtime CPU, 1 intra-op thread: measure a fresh host profile (fp32 + int8,
``resolve_profile("host")`` into a private cache, so the check and the profile see the same load) for the
``deit-tiny`` and ``digits`` specs, then for 10 latency budgets per spec, spread geometrically
over the range the profile covers (its fastest option at depth 2 .. 14), probe the profile for
drift (``tleg_deploy.profile.drift``: the probe-corrected predictions are what fit/solve use),
solve, export the pick and the next deeper depth (same precision, and every other precision), and
time them with the profiler's own protocol in interleaved rounds. Counts:

- *within*: the pick's measured p90 <= its budget (target 20/20);
- *tight*: the next deeper depth (pick's precision) measured over budget (target >= 18/20);
  also reported for the best precision at that depth;
- solve time: median / max over 200 calls per budget (target: well under 1 ms);
- *closed loop* (issue 10): what ``fit`` does on a device it can measure: from the solver's pick, the measured
  step loop (``deploy.fit_measure.measured_check``: down while over budget, up while the next deeper depth still
  measures within it, at most 3 steps each way) times each depth in its own session; then the loop's pick and
  the next deeper depth are timed again, each alone in its session (as deployed), alternating, 5 times each,
  independently of the loop's own readings: *within* and *tight* of the closed loop come from that
  re-measurement (targets 20/20 and >= 18/20).

Timings on a shared machine are noisy; rerun on a quiet one:
    .venv/bin/python benchmarks/solver.py [--budgets-per-spec 10] [--specs deit-tiny,digits]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import spec_names, write_result  # type: ignore[import-not-found]

from tleg_deploy.profile.env import conditions


def host_profile(spec: Any, cached: bool) -> Any:
    """The host profile users get (``resolve_profile("host")``), measured afresh into a private cache
    directory unless ``cached``: a profile taken under other load than the check would mislead."""
    from tleg_deploy.profile.registry import ENV_CACHE, resolve_profile

    if cached:
        return resolve_profile("host", spec=spec, quiet=True)
    with tempfile.TemporaryDirectory(prefix="tleg-solver-cache-") as tmp:
        before = os.environ.get(ENV_CACHE)
        os.environ[ENV_CACHE] = tmp
        try:
            return resolve_profile("host", spec=spec, quiet=True)
        finally:
            if before is None:
                os.environ.pop(ENV_CACHE, None)
            else:
                os.environ[ENV_CACHE] = before


class Artifacts:
    """Exported ONNX runners per (depth, precision), built once (random weights: latency does not
    depend on them)."""

    def __init__(self, spec: Any, workdir: Path) -> None:
        self.spec, self.workdir, self.cache = spec, workdir, {}

    def runner(self, depth: int, precision: str) -> Any:
        from tleg_deploy.profile.runners import OrtRunner, build_model, export_artifact

        key = (depth, precision)
        if key not in self.cache:
            sub = self.workdir / f"{depth}-{precision}"
            sub.mkdir(exist_ok=True)
            path = export_artifact(build_model(self.spec, depth), precision, "onnxruntime", sub)
            self.cache[key] = OrtRunner(path, self.spec, 1, 1, "cpu")
        return self.cache[key]


class SessionTimer:
    """fit's timer as the benchmarks run it: each call times one depth at ``precision`` alone in its own session
    (the profiler's protocol, ``cfg``), from ``arts``' cached runners; ``calls`` counts them."""

    def __init__(self, arts: Artifacts, precision: str, cfg: Any) -> None:
        self.arts, self.precision, self.cfg, self.calls = arts, precision, cfg, 0

    def __call__(self, depth: int) -> Any:
        from tleg_deploy.profile.artifact import Measurement
        from tleg_deploy.profile.timing import time_runners

        self.calls += 1
        st = time_runners({depth: self.arts.runner(depth, self.precision)}, self.cfg)[depth]
        return Measurement(depth=depth, precision=self.precision, p50_ms=st["p50"], p90_ms=st["p90"],
                           runs=int(st["n"]), threads=1)


REMEASURE = 5  # sessions per depth in the independent re-measure (the judge)


def remeasure(timer: SessionTimer, depths: list[int]) -> dict[int, list[float]]:
    """The judge: ``depths`` re-timed as deployed and as the loop times them, each model alone in its session (a
    deployment runs one model; interleaving two in one session evicts each other's caches and reads 5-25% slower
    here), the sessions alternating depth by depth ``REMEASURE`` times; p90 per session. One session's reading
    moves by 2-5% here: the median of 5 is about as precise as the loop's own verdicts (3-8 timings)."""
    reps: dict[int, list[float]] = {d: [] for d in depths}
    for _ in range(REMEASURE):
        for d in depths:
            reps[d].append(timer(d).p90_ms)
    return reps


def spread_budgets(prof: Any, spec: Any, n: int) -> list[float]:
    """``n`` p90 latency budgets (ms) spread geometrically over what ``prof`` covers: from the fastest
    precision's 95% upper prediction at depth 2 to the one at depth 14."""
    def fastest_upper(depth: int) -> float:
        return min(prof.predict(depth, spec=spec, precision=p).latency_p90_upper_ms for p in prof.precisions(spec))

    lo, hi = fastest_upper(2), fastest_upper(14)
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def solve_time_us(prof: Any, budget: Any, spec: Any, max_depth: int, reps: int = 200) -> tuple[float, float]:
    """Median and 99th percentile of ``reps`` solves, in microseconds."""
    from tleg_deploy.plan.solve import solve

    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        solve(prof, budget, spec=spec, max_depth=max_depth)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    times.sort()
    return statistics.median(times), times[int(0.99 * (len(times) - 1))]


def run_spec(name: str, n_budgets: int, max_depth: int, cached: bool) -> list[dict[str, Any]]:
    from tleg_deploy.errors import InfeasibleError
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.plan.solve import Budget, solve
    from tleg_deploy.profile.config import MeasureConfig
    from tleg_deploy.profile.timing import time_runners

    spec = ViTSpec.preset(name)
    t0 = time.time()
    prof = host_profile(spec, cached)
    print(f"[{name}] host profile ready in {time.time() - t0:.0f} s: precisions {prof.precisions(spec)}", flush=True)
    # What fit/solve use: the profile probed for drift (tleg_deploy.profile.drift), rescaled beyond the threshold.
    from tleg_deploy.profile.drift import probe_and_apply

    prof = probe_and_apply(prof, log=lambda msg: print(f"[{name}] {msg}", flush=True))
    precisions = prof.precisions(spec)
    budgets = spread_budgets(prof, spec, n_budgets)
    cfg = MeasureConfig(threads=1, rounds=7, round_seconds=0.15, memory=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tleg-solver-bench-") as tmp:
        arts = Artifacts(spec, Path(tmp))
        for b in budgets:
            budget = Budget(latency_ms=math.ceil(b * 1e4) / 1e4)
            try:
                plan = solve(prof, budget, spec=spec, max_depth=max_depth)
            except InfeasibleError as e:
                rows.append({"spec": name, "budget_ms": budget.latency_ms, "infeasible": str(e)})
                continue
            med_us, max_us = solve_time_us(prof, budget, spec, max_depth)
            d, p = plan.depth, plan.precision
            keys: dict[int, tuple[int, str]] = {0: (d, p)}
            if d < max_depth:
                keys[1] = (d + 1, p)
                for q in precisions:
                    if q != p:
                        keys[len(keys)] = (d + 1, q)
            runners = {k: arts.runner(*v) for k, v in keys.items()}
            stats = time_runners(runners, cfg)
            deeper_all = {keys[k][1]: stats[k]["p90"] for k in keys if k >= 1}
            row = {
                "spec": name, "budget_ms": budget.latency_ms, "depth": d, "precision": p,
                "binding": plan.binding, "predicted_p90_ms": plan.pick.latency_ms,
                "predicted_p90_upper_ms": plan.pick.latency_upper_ms, "measured_p90_ms": stats[0]["p90"],
                "within": stats[0]["p90"] <= budget.latency_ms, "extrapolated": plan.pick.extrapolated,
                "deeper_measured_p90_ms": deeper_all.get(p), "deeper_all_precisions_p90_ms": deeper_all,
                "tight": (deeper_all[p] > budget.latency_ms) if p in deeper_all else None,
                "tight_any_precision": (min(deeper_all.values()) > budget.latency_ms) if deeper_all else None,
                "solve_us_median": med_us, "solve_us_p99": max_us,
                "drift": prof.drift.to_dict() if prof.drift is not None else None,
            }
            row.update(closed_loop(spec, prof, budget, plan, max_depth, arts, cfg))
            rows.append(row)
            print(f"[{name}] closed loop: depth {row['loop_depth']} ({len(row['loop_steps'])} step(s)); re-measured "
                  f"{row['loop_measured_p90_ms']:.4g} ms, deeper {row['loop_deeper_p90_ms']:.4g} ms", flush=True)
            print(f"[{name}] budget {budget.latency_ms:.4g} ms -> depth {d} {p}: measured p90 "
                  f"{stats[0]['p90']:.4g} ms (upper {plan.pick.latency_upper_ms:.4g}); deeper "
                  f"{deeper_all.get(p, math.nan):.4g} ms; solve {med_us:.0f} us", flush=True)
    return rows


def closed_loop(spec: Any, prof: Any, budget: Any, plan: Any, max_depth: int, arts: Artifacts,
                cfg: Any) -> dict[str, Any]:
    """fit's measured step loop from the solver's pick (each depth timed in its own session), then the loop's
    pick and the next deeper depth re-timed in alternating sessions (``remeasure``), independently of the loop's
    readings."""
    from tleg_deploy.deploy.fit_measure import measured_check, verdict
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.errors import InfeasibleError

    timer = SessionTimer(arts, plan.precision, cfg)
    request = FitRequest(budget, device=prof, out_dir=Path("unused"), search=SearchOptions(max_depth=max_depth))
    try:
        depth, own, steps, _over = measured_check(request, plan, prof, budget.latency_ms, timer,
                                                  lambda m: print(f"  loop: {m}", flush=True))
    except InfeasibleError as e:
        return {"loop_depth": None, "loop_steps": [str(e)], "loop_timings": timer.calls, "loop_within": False,
                "loop_tight": None, "loop_within_judge3": False, "loop_tight_judge3": None,
                "loop_measured_p90_ms": math.nan, "loop_deeper_p90_ms": math.nan, "loop_judge_sure": None,
                "loop_deeper_judge_sure": None}
    # The judge (``remeasure``): the median of its 5 sessions; the median of the first 3 (the judge of runs before
    # 2026-12-03) is reported beside it.
    loop_timings = timer.calls
    reps = remeasure(timer, [depth, depth + 1] if depth < max_depth else [depth])
    mine, mine3 = statistics.median(reps[depth]), statistics.median(reps[depth][:3])
    deeper = statistics.median(reps[depth + 1]) if depth + 1 in reps else math.nan
    deeper3 = statistics.median(reps[depth + 1][:3]) if depth + 1 in reps else math.nan
    return {"loop_depth": depth, "loop_steps": steps, "loop_timings": loop_timings,
            "loop_measured_p90_ms": mine, "loop_own_p90_ms": own.p90_ms if own is not None else math.nan,
            "loop_within": mine <= budget.latency_ms, "loop_deeper_p90_ms": deeper,
            "loop_tight": (deeper > budget.latency_ms) if depth + 1 in reps else None,
            "loop_within_judge3": mine3 <= budget.latency_ms,
            "loop_tight_judge3": (deeper3 > budget.latency_ms) if depth + 1 in reps else None,
            # whether the judge's own 5 readings decide within / over at fit's one-sided 95% bound, or leave it open
            "loop_judge_sure": verdict(reps[depth], budget.latency_ms)[0],
            "loop_deeper_judge_sure": verdict(reps[depth + 1], budget.latency_ms)[0] if depth + 1 in reps else None,
            "remeasured_p90_ms": {str(d): v for d, v in reps.items()}}


def _thin(row: dict[str, Any]) -> bool:
    """Whether ``fit`` would add its thin-margin note to this closed-loop pick (``fit._result``'s test)."""
    from tleg_deploy.deploy.fit_measure import thin_margin

    own = row.get("loop_own_p90_ms")
    return own is not None and math.isfinite(own) and thin_margin(own, row["budget_ms"])


def _judge_line(summary: dict[str, Any]) -> str:
    """How sure the judge is of the closed loop's misses (its own readings under fit's 95% rule)."""
    w, t = summary["loop_within_misses_judge"], summary["loop_tight_misses_judge"]
    return (f"- the closed loop's misses as the judge's own 5 readings decide them (median, one-sided 95% t bound, "
            f"fit's rule): picks over budget {sum(w.values())}, of which sure {w['over']} and inside the judge's "
            f"noise {w['open']}; next deeper within budget {sum(t.values())}, of which sure {t['within']} and "
            f"inside the judge's noise {t['open']}")


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    from tleg_deploy.deploy.fit_measure import THIN_REL

    thin = summary["thin_note"]
    lines = [
        "## Solver and fit's closed loop: measured fit of the pick (issues 6, 10)",
        "",
        "`benchmarks/solver.py`: host profile (ONNX Runtime CPU, 1 intra-op thread, fp32 + int8), 10 p90 "
        "latency budgets per spec spread geometrically over the profile's range; each pick and the next deeper "
        "depth exported and timed with the profiler's protocol (interleaved rounds), after the profile's drift "
        "probe. *Closed loop*: fit's measured step loop from the pick (`deploy.fit_measure.measured_check`, each "
        "depth timed in its own session, at most 3 steps each way), then its pick and the next deeper depth "
        "re-timed independently of the loop's readings, as deployed: each model alone in its own session (as the "
        "loop and a deployment run it), sessions alternating pick / deeper 5 times, medians (the median of the "
        "first 3, the judge of runs before 2026-12-03, is given too). A reading within 5% of the budget is timed "
        "afresh 3-8 times (not counting it) until their median's one-sided 95% t bound clears the budget (kept as "
        "over if it never does); so is, when the search ends, the pick read once within 15% under the budget. The "
        "solver-only columns time the pick and the deeper depths interleaved in one session, as the profile is "
        "measured.",
        "",
        f"- load average (1/5/15 min) before {summary['load_average_before']}, after "
        f"{summary['load_average_after']}, on {summary['cores']} cores",
        f"- pick's measured p90 within budget: **{summary['within']}/{summary['n']}** (target: all)",
        f"- next deeper depth (same precision) measured over budget: **{summary['tight']}/{summary['n_tight']}** "
        f"(target: >= 18 of 20); with the fastest precision at that depth: {summary['tight_any']}/{summary['n_tight']}",
        f"- **closed loop** (fit's measured steps from the pick, then re-measured independently): within budget "
        f"**{summary['loop_within']}/{summary['n']}**, next deeper over budget **{summary['loop_tight']}/"
        f"{summary['n_loop_tight']}** (targets 20/20 and >= 18/20); {summary['loop_moved']} pick(s) moved by the "
        f"loop; judged by the median of the first 3 re-measure sessions only: {summary['loop_within_judge3']}/"
        f"{summary['n']} and {summary['loop_tight_judge3']}/{summary['n_loop_tight']}",
        _judge_line(summary),
        f"- fit's thin-margin note (the pick measured within {THIN_REL:.0%} under the budget) on "
        f"{thin['picks']}/{summary['n']} picks; of the {thin['misses']} picks judged over the budget, "
        f"{thin['misses_noted']} had it",
        f"- timings the loop took per budget (1 s sessions): median {statistics.median(summary['loop_timings'])}, "
        f"max {max(summary['loop_timings'])}" if summary.get("loop_timings") else "",
        *(f"- {spec}: the re-measured pick vs the loop's own reading of it, |difference|: median "
          f"{statistics.median(v):.1%}, max {max(v):.1%} (the noise floor of the counts above)"
          for spec, v in summary.get("loop_reading_vs_remeasure", {}).items() if v),
        f"- solve time: median {summary['solve_us_median']:.0f} us; worst per-budget p99 "
        f"{summary['solve_us_p99_worst']:.0f} us (target: well under 1 ms)",
        "",
        "| spec | budget ms | pick | predicted p90 (upper) ms | measured p90 ms | within | deeper measured ms | "
        "tight | closed loop: depth (steps) | re-measured ms | within | deeper ms | tight |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "infeasible" in r:
            lines.append(f"| {r['spec']} | {r['budget_ms']:.4g} | infeasible | | | | | |")
            continue
        deeper = "-" if r["deeper_measured_p90_ms"] is None else f"{r['deeper_measured_p90_ms']:.4g}"
        lines.append(
            f"| {r['spec']} | {r['budget_ms']:.4g} | {r['depth']} {r['precision']}"
            f"{' (extrap.)' if r['extrapolated'] else ''} | {r['predicted_p90_ms']:.4g} "
            f"({r['predicted_p90_upper_ms']:.4g}) | {r['measured_p90_ms']:.4g} | {'yes' if r['within'] else 'NO'} | "
            f"{deeper} | {'yes' if r['tight'] else ('-' if r['tight'] is None else 'no')} | "
            f"{r['loop_depth']} ({len(r['loop_steps'])}) | {r['loop_measured_p90_ms']:.4g} | "
            f"{'yes' if r['loop_within'] else 'NO'} | {r['loop_deeper_p90_ms']:.4g} | "
            f"{'yes' if r['loop_tight'] else ('-' if r['loop_tight'] is None else 'no')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", type=spec_names, default="deit-tiny,digits")
    ap.add_argument("--budgets-per-spec", type=int, default=10)
    ap.add_argument("--max-depth", type=int, default=24)
    ap.add_argument("--cached", action="store_true", help="use the cached host profile instead of a fresh one")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    for name in args.specs:
        rows += run_spec(name, args.budgets_per_spec, args.max_depth, args.cached)
    done = [r for r in rows if "infeasible" not in r]
    tight = [r for r in done if r["tight"] is not None]
    summary = {
        "n": len(done), "within": sum(r["within"] for r in done),
        "n_tight": len(tight), "tight": sum(bool(r["tight"]) for r in tight),
        "tight_any": sum(bool(r["tight_any_precision"]) for r in tight),
        "loop_within": sum(bool(r["loop_within"]) for r in done),
        "n_loop_tight": sum(r["loop_tight"] is not None for r in done),
        "loop_tight": sum(bool(r["loop_tight"]) for r in done),
        "loop_moved": sum(r["loop_depth"] != r["depth"] for r in done),
        "loop_within_judge3": sum(bool(r.get("loop_within_judge3")) for r in done),
        "loop_tight_judge3": sum(bool(r.get("loop_tight_judge3")) for r in done),
        "loop_timings": sorted(r.get("loop_timings", 0) for r in done),
        # the misses the judge itself is sure of (its 5 readings clear the budget by fit's one-sided 95% bound), and
        # those inside its own noise ("open": another judge could count them either way)
        "loop_within_misses_judge": {v: sum(r.get("loop_judge_sure") == v for r in done if not r["loop_within"])
                                     for v in ("over", "open")},
        "loop_tight_misses_judge": {v: sum(r.get("loop_deeper_judge_sure") == v for r in done
                                           if r["loop_tight"] is False) for v in ("within", "open")},
        # fit's thin-margin note (its pick measured within THIN_REL under the budget): how often it shows, and how
        # many of the picks judged over it warned of
        "thin_note": {"picks": sum(_thin(r) for r in done),
                      "misses": sum(not r["loop_within"] for r in done if r.get("loop_depth") is not None),
                      "misses_noted": sum(_thin(r) for r in done if not r["loop_within"])},
        # how far the re-measurement of the loop's pick lands from the loop's own reading of it: the noise floor
        # any within/tight count on this machine is subject to
        "loop_reading_vs_remeasure": {
            spec: sorted(abs(r["loop_measured_p90_ms"] / r["loop_own_p90_ms"] - 1) for r in done
                         if r["spec"] == spec and r.get("loop_own_p90_ms", 0) > 0)
            for spec in dict.fromkeys(r["spec"] for r in done)},
        "solve_us_median": statistics.median(r["solve_us_median"] for r in done) if done else math.nan,
        "solve_us_p99_worst": max((r["solve_us_p99"] for r in done), default=math.nan),
        "infeasible": len(rows) - len(done),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count(),
        "conditions_after": conditions(),
    }
    print(summary)
    write_result("solver", {"summary": summary, "rows": rows, "args": vars(args),
                            "note": "load average before/after in the summary"}, markdown(rows, summary))


if __name__ == "__main__":
    sys.exit(main())
