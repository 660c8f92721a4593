"""How well does a 3-depth profile predict every depth, on the machine as it is now? (issues 4, 15)

On this machine, ONNX Runtime CPU, 1 thread, batch 1, fp32, for the ``deit-tiny`` and ``digits``
specs: fit the depth cost model from 3 depths (1, 12, 24) with the profiler's own protocol, then
measure every other depth 2..24 independently (4 more sessions of 3 interleaved depths each, as many
live models as the profiling session) and compare. Reports the
share of depths whose predicted p50 is within ±5% and ±10% of the measured p50, the median and
worst absolute error, how often the measured p50 falls inside the 95% prediction interval, and how
long profiling took; per run: raw accuracy, accuracy after the drift probe's correction (the profile
probed before each check session, as fit/solve do), interval coverage, the probe history and the
machine's conditions (load average, CPU MHz). Targets (issue 15): interval coverage >= 90% and
drift-corrected within ±10% for >= 90% of depths, in every run.

    .venv/bin/python benchmarks/predictor_accuracy.py            # full run, a few minutes
    .venv/bin/python benchmarks/predictor_accuracy.py --quick    # smoke test, not written to RESULTS.md

The load average and CPU clocks at each run's start and end are recorded with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from _results import spec_names, write_result  # also puts the repository root on sys.path

from tleg_deploy.export.template import clear_shared_templates
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile import drift
from tleg_deploy.profile.env import conditions
from tleg_deploy.profile.linefit import fit_line
from tleg_deploy.profile.measure import MeasureConfig, measure_points, profile

FIT_DEPTHS = (1, 12, 24)
# The check measures depths in separate sessions of 3 interleaved depths each ((2, 10, 18), (4, 12, 20),
# ...): as many live models as the profiling session has. With all 24 models loaded in one process the
# deep digits models ran 10-25% slower than a line through the same session's own points (cache/TLB
# pressure from 24 live sessions), an artifact no deployment of one model sees.
#
# Checked: every other depth (2, 4, ..., 24) in 4 such sessions. Issue 15: one run checking all 24 depths took
# 8.3 min on the shared 2-core machine (load 2-7), over the 8-minute budget per run; the even depths span the same
# range (and include the fit depths 12 and 24), at half the cost.
CHECK_DEPTHS = tuple(range(2, 25, 2))
CHECK_GROUPS = tuple(CHECK_DEPTHS[i::4] for i in range(4))


def run_spec(name: str, *, rounds: int, round_seconds: float, clock: str = "wall") -> dict[str, Any]:
    spec = ViTSpec.preset(name)
    start = conditions()
    learngene = None
    if name == "digits":
        from tleg_deploy.model.resources import load_learngene

        learngene = load_learngene("demo")
    fit_cfg = MeasureConfig(
        depths=FIT_DEPTHS, rounds=rounds, round_seconds=round_seconds, memory=clock == "wall", clock=clock
    )
    clear_shared_templates()  # each run's profiling cold, with its own exporter trace
    t0 = time.perf_counter()
    prof = profile(spec, name="host", config=fit_cfg, learngene=learngene)
    profiling_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    measured = []
    readings: list[drift.DriftReading] = []
    corrected_by_depth: dict[int, Any] = {}
    used = prof
    for group in CHECK_GROUPS:
        # What a user sees: the cached profile is probed (about 1 s) right before it is used; the
        # group's depths are then built and timed, as a deployment would be after solve/fit. Each
        # use's probe stays recorded in the profile (as fit/profile keep it in the host cache), so the
        # variation between uses widens the intervals of the later uses.
        reading = drift.probe(used)
        readings.append(reading)
        corrected = used = drift.apply(used, reading)
        check_cfg = MeasureConfig(
            depths=group, rounds=rounds, round_seconds=round_seconds, memory=False, seed=1, clock=clock
        )
        measured += measure_points(spec, check_cfg, "fp32", learngene=learngene)
        corrected_by_depth.update({d: corrected for d in group})
    measured.sort(key=lambda p: p.depth)
    check_s = time.perf_counter() - t0
    rows = []
    for point in measured:
        pred = prof.predict(point.depth, spec=spec, precision="fp32")
        cpred = corrected_by_depth[point.depth].predict(point.depth, spec=spec, precision="fp32")
        err = (pred.latency_p50_ms - point.p50_ms) / point.p50_ms
        cerr = (cpred.latency_p50_ms - point.p50_ms) / point.p50_ms
        half = pred.latency_p50_upper_ms - pred.latency_p50_ms
        chalf = cpred.latency_p50_upper_ms - cpred.latency_p50_ms
        rows.append(
            {
                "depth": point.depth,
                "measured_p50_ms": point.p50_ms,
                "predicted_p50_ms": pred.latency_p50_ms,
                "rel_error": err,
                "in_interval": abs(pred.latency_p50_ms - point.p50_ms) <= half,
                "corrected_p50_ms": cpred.latency_p50_ms,
                "corrected_rel_error": cerr,
                "corrected_in_interval": abs(cpred.latency_p50_ms - point.p50_ms) <= chalf,
                "interval_half_rel": chalf / max(cpred.latency_p50_ms, 1e-12),
                "measured_p90_ms": point.p90_ms,
                "predicted_p90_ms": pred.latency_p90_ms,
                "fit_point": point.depth in FIT_DEPTHS,
            }
        )
    errs = [abs(r["rel_error"]) for r in rows]
    cerrs = [abs(r["corrected_rel_error"]) for r in rows]
    fit = prof.entries[0].fit.latency_p50
    # Diagnostic: the same line fitted to the check's own depths 2/12/24 separates the model's error
    # (is latency linear in depth?) from drift between profiling and checking (machine load).
    own_depths = (CHECK_DEPTHS[0], *FIT_DEPTHS[1:])  # 2, 12, 24: the check's own ends and middle
    own = fit_line(list(own_depths), [p.p50_ms for p in measured if p.depth in own_depths])
    own_errs = [abs(own.value(p.depth) - p.p50_ms) / p.p50_ms for p in measured]
    return {
        "spec": name,
        "clock": clock,
        "fit_depths": list(FIT_DEPTHS),
        "checked_depths": [r["depth"] for r in rows],
        "within_5pct": sum(e <= 0.05 for e in errs) / len(errs),
        "within_10pct": sum(e <= 0.10 for e in errs) / len(errs),
        "median_abs_error": statistics.median(errs),
        "max_abs_error": max(errs),
        "interval_coverage": sum(r["corrected_in_interval"] for r in rows) / len(rows),
        "raw_interval_coverage": sum(r["in_interval"] for r in rows) / len(rows),
        "corrected": {
            "within_5pct": sum(e <= 0.05 for e in cerrs) / len(cerrs),
            "within_10pct": sum(e <= 0.10 for e in cerrs) / len(cerrs),
            "median_abs_error": statistics.median(cerrs),
            "max_abs_error": max(cerrs),
        },
        "probe": {
            "reference": prof.probe.to_dict() if prof.probe else None,
            "variation_rel": prof.probe.variation_rel if prof.probe else None,
            "variation_rel_after_uses": used.probe.variation_rel if used.probe else None,
            "readings": [r.to_dict() for r in readings],
            "rescaled": sum(r.status == "rescaled" for r in readings),
        },
        "conditions": {"start": start, "end": conditions()},
        "check_data_fit": {
            "within_5pct": sum(e <= 0.05 for e in own_errs) / len(own_errs),
            "median_abs_error": statistics.median(own_errs),
            "max_abs_error": max(own_errs),
        },
        "session_drift": statistics.median(r["rel_error"] for r in rows),
        "probe_drift": statistics.median(r.drift for r in readings if r.drift is not None)
        if any(r.drift is not None for r in readings) else None,
        "fit": {
            "intercept_ms": fit.intercept,
            "slope_ms_per_block": fit.slope,
            "r2": fit.r2,
            "loo_error_rel": fit.loo_error_rel,
        },
        "profiling_seconds": profiling_s,
        "check_seconds": check_s,
        "rows": rows,
    }


def _load(c: dict[str, Any]) -> str:
    load = c.get("load_average")
    return "n/a" if not load else f"{load[0]:.2f}"


def _mhz(c: dict[str, Any]) -> str:
    mhz = c.get("scaling_cur_freq_mhz") or c.get("cpuinfo_mhz")
    return "n/a" if not mhz else f"{statistics.fmean(mhz):.0f}"


def markdown(results: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    lines = [
        "## Predictor accuracy (ONNX Runtime CPU, 1 thread, batch 1, fp32)",
        "",
        f"Fit from depths {', '.join(map(str, FIT_DEPTHS))} (`tleg_deploy.profile.measure.profile`, which also "
        f"records the drift probe's reference: depth {FIT_DEPTHS[1]} timed at the start, mid-session and end of "
        f"profiling), then every other depth 2-24 measured again, independently, in 4 sessions of 3 interleaved depths "
        "(halved from all 24 depths in 8 sessions: one such run took 8.3 min under load, over the 8-min budget); "
        f"{cfg['rounds']} rounds, ~{cfg['round_seconds']} s per depth per round. "
        "Script: `benchmarks/predictor_accuracy.py`.",
        "",
        "What a user sees: before each of the 4 check sessions the cached profile is *probed* "
        "(`tleg_deploy.profile.drift.probe`: the reference depth re-timed for about 1 s with the profiler's "
        f"protocol); beyond ±{drift.DRIFT_THRESHOLD:.0%} drift the predictions are rescaled by the probe. "
        "*raw* = the profile's prediction as measured; *corrected* = after the probe (what `fit`/`solve` use). "
        "*interval coverage* = share of depths whose measured p50 falls inside the corrected 95% prediction "
        "interval, which includes the machine's variation over the profiling time and between the profile's uses "
        "(`ProbeInfo.variation_rel`: each check session's probe is recorded, as `fit` records it in the host "
        "cache, so later sessions see the variation the earlier probes found). "
        "Targets (issue 15): interval coverage >= 90% and corrected within ±10% >= 90% of depths, in every run.",
        "",
        "Latency is wall-clock time (`clock=wall`). *check-data fit*: the same 3-depth line fitted to the check's "
        "own measurements (within ±5% there means latency *is* linear in depth); *session drift*: median signed "
        "raw error; *probe drift*: median drift the 4 probes saw; *variation*: the profile's recorded relative "
        "variation over time, as profiled → after the 4 uses; *load* = 1-min load average at the run's start / end on "
        f"{os.cpu_count()} cores; *MHz*: mean CPU clock read at the start (cpufreq where readable, else "
        "/proc/cpuinfo).",
        "",
        f"Each spec was profiled and checked {cfg.get('repeats', 1)} times, independently (no run is selected).",
        "",
        "| run | spec | load | MHz | raw ±5% | raw ±10% | raw median err | corrected ±5% | **corrected ±10%** | "
        "corrected median err | **interval coverage** | interval ± (median) | raw interval coverage | probe drift | "
        "rescaled | "
        "variation | session drift | check-data fit ±5% | profiling took |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r["corrected"]
        probe = r["probe"]
        pd, var, var2 = r.get("probe_drift"), probe["variation_rel"], probe.get("variation_rel_after_uses")
        lines.append(
            f"| {r.get('run', 1)} | {r['spec']} | {_load(r['conditions']['start'])} / "
            f"{_load(r['conditions']['end'])} | {_mhz(r['conditions']['start'])} | {r['within_5pct']:.0%} | "
            f"{r['within_10pct']:.0%} | {r['median_abs_error']:.1%} | {c['within_5pct']:.0%} | "
            f"{c['within_10pct']:.0%} | {c['median_abs_error']:.1%} | {r['interval_coverage']:.0%} | "
            f"{statistics.median(x['interval_half_rel'] for x in r['rows']):.0%} | "
            f"{r['raw_interval_coverage']:.0%} | {'n/a' if pd is None else f'{pd:+.1%}'} | "
            f"{probe['rescaled']}/{len(probe['readings'])} | "
            f"{'n/a' if var is None else f'{var:.1%}'}{'' if var2 is None else f' → {var2:.1%}'} | "
            f"{r['session_drift']:+.1%} | {r['check_data_fit']['within_5pct']:.0%} | {r['profiling_seconds']:.0f} s |"
        )
    met = [r for r in results if r["interval_coverage"] >= 0.9 and r["corrected"]["within_10pct"] >= 0.9]
    lines += ["", f"**Runs meeting both targets: {len(met)}/{len(results)}.**"]
    chaotic = [r for r in results if r["check_data_fit"]["within_5pct"] < 0.5]
    if chaotic:
        lines.append(
            f"In {len(chaotic)}/{len(results)} runs the check's *own* measurements were not on a line (check-data fit "
            "within ±5% below 50%): the machine changed speed between and within the check's sessions, seconds "
            "apart, so no single correction (a probe taken seconds before) can bring those depths within ±10%; "
            "the interval's width (column *interval ±*) is what the probe history says the machine does.")
    for spec in dict.fromkeys(r["spec"] for r in results):
        mine = [r for r in results if r["spec"] == spec and r["clock"] == "wall"]
        cov = sorted(r["interval_coverage"] for r in mine)
        c10 = sorted(r["corrected"]["within_10pct"] for r in mine)
        raw10 = sorted(r["within_10pct"] for r in mine)
        lines.append(
            f"- {spec}: interval coverage {cov[0]:.0%}-{cov[-1]:.0%}; corrected within ±10% {c10[0]:.0%}-{c10[-1]:.0%} "
            f"(raw {raw10[0]:.0%}-{raw10[-1]:.0%}) over {len(mine)} run(s)"
        )
    load = cfg.get("load_average")
    lines += [
        "",
        f"Load average (1 min) before / after the whole benchmark: {load[0]} / {load[1]} on {os.cpu_count()} cores"
        + (" (busy: other jobs shared the CPUs, as on the machines the issue is about)." if max(load) > 1.0 else "."),
        f"Whole benchmark took {cfg.get('seconds', 0) / 60:.1f} min.",
    ]
    for r in results:
        worst = sorted(r["rows"], key=lambda x: -abs(x["corrected_rel_error"]))[:3]
        hist = r["probe"]["reference"]["history"] if r["probe"]["reference"] else []
        lines.append(
            f"- run {r.get('run', 1)}, {r['spec']}: slope {r['fit']['slope_ms_per_block']:.4g} ms/block, intercept "
            f"{r['fit']['intercept_ms']:.4g} ms; probe history while profiling (ms): "
            + ", ".join(f"{h['p50_ms']:.4g}" for h in hist)
            + "; probes before the checks (drift): "
            + ", ".join(f"{x['drift']:+.0%}" if x["drift"] is not None else x["status"] for x in r["probe"]["readings"])
            + "; largest corrected errors at depths "
            + ", ".join(f"{w['depth']} ({w['corrected_rel_error']:+.1%})" for w in worst)
        )
    return "\n".join(lines)


def render() -> None:
    """Rewrite results/predictor_accuracy.md (and RESULTS.md) from the saved JSON, keeping its machine line."""
    import json

    from _results import RESULTS_DIR, machine_line
    from make_results import build  # type: ignore[import-not-found]

    data = json.loads((RESULTS_DIR / "predictor_accuracy.json").read_text())
    text = markdown(data["results"], data["config"]).rstrip() + f"\n\n_{machine_line(data['machine'])}_\n"
    (RESULTS_DIR / "predictor_accuracy.md").write_text(text)
    build()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", type=spec_names, default="deit-tiny,digits")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=0.15)
    parser.add_argument("--clocks", default="wall", help="wall (latency), or wall,thread to add a CPU-time diagnostic")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="independent profile+check runs per spec; all are reported (run-to-run spread)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds, digits only; prints, writes nothing")
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rebuild this section of RESULTS.md from results/predictor_accuracy.json")
    args = parser.parse_args()
    if args.render:
        render()
        return
    specs = ["digits"] if args.quick else args.specs
    rounds = 2 if args.quick else args.rounds
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results = []
    runs = [
        (n, c.strip(), k) for k in range(1, max(1, args.repeats) + 1) for n in specs for c in args.clocks.split(",")
    ]
    for name, clock, repeat in runs:
        r = run_spec(name, rounds=rounds, round_seconds=args.round_seconds, clock=clock)
        r["run"] = repeat
        print(
            f"[run {repeat}] {name} ({clock}): interval coverage {r['interval_coverage']:.0%}, corrected within "
            f"±10% {r['corrected']['within_10pct']:.0%} (±5% {r['corrected']['within_5pct']:.0%}); raw within "
            f"±5% {r['within_5pct']:.0%}, ±10% {r['within_10pct']:.0%}, median abs error "
            f"{r['median_abs_error']:.1%}, worst {r['max_abs_error']:.1%}, raw interval coverage "
            f"{r['raw_interval_coverage']:.0%}, profiling {r['profiling_seconds']:.1f} s; check-data fit within ±5% "
            f"{r['check_data_fit']['within_5pct']:.0%}, drift {r['session_drift']:+.1%}",
            flush=True,
        )
        results.append(r)
    cfg = {
        "rounds": rounds,
        "round_seconds": args.round_seconds,
        "repeats": max(1, args.repeats),
        "threads": 1,
        "batch": 1,
        "precision": "fp32",
        "backend": "onnxruntime",
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": time.perf_counter() - started,
        "drift_threshold": drift.DRIFT_THRESHOLD,
    }
    if not args.quick:
        write_result("predictor_accuracy", {"config": cfg, "results": results}, markdown(results, cfg))


if __name__ == "__main__":
    main()
