"""The report's sections: each turns one input (profiles, a benchmark's results, a manifest) into
markdown and at most one figure, or says which command produces the missing input."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan import costs
from tleg_deploy.report import plots
from tleg_deploy.report.inputs import (
    BENCHMARKS,
    PAPER_CLAIMS_SPEC,
    LearngeneFacts,
    Results,
    accuracy_table,
    machine_line,
    spec_label,
)

if TYPE_CHECKING:
    from tleg_deploy.report.build import Report

STORAGE_DEPTHS = tuple(range(1, 13))
_NICE = (1.0, 2.0, 5.0)


def nice_budget(x: float) -> float:
    """The 1-2-5 value nearest to ``x`` on a log scale (0.37 -> 0.5, 7 -> 5)."""
    exp = math.floor(math.log10(x))
    cands = [m * 10.0**e for e in (exp - 1, exp, exp + 1) for m in _NICE]
    return min(cands, key=lambda c: abs(math.log(c / x)))


def budget_ladder(lo: float, hi: float, limit: int = 8) -> list[float]:
    """1-2-5 budgets from just under ``lo`` up to the first one >= ``hi`` (at most ``limit``)."""
    exp = math.floor(math.log10(lo))
    out: list[float] = []
    while len(out) < 64:
        for m in _NICE:
            v = round(m * 10.0**exp, 12)
            if v >= lo * 0.5 and (not out or out[-1] < hi):
                out.append(v)
        if out and out[-1] >= hi:
            break
        exp += 1
    if len(out) > limit:  # keep the ends, thin the middle
        step = (len(out) - 1) / (limit - 1)
        out = [out[round(i * step)] for i in range(limit)]
    return out


def header(rep: Report, lg: LearngeneFacts, results: Results, profiles: Sequence[Any]) -> None:
    from tleg_deploy import __version__

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    have = [n for n in BENCHMARKS if results.get(n)]
    lacking = [n for n in BENCHMARKS if not results.get(n)]
    rep.add(
        "# tleg-deploy report", "",
        f"Generated {now} by tleg-deploy {__version__}. Every number below comes from a run: a device profile "
        f"(measured, or a roofline estimate where it says so) or a benchmark results file in `{results.directory}`.",
        "",
        f"- **Learngene**: {lg.label}, {spec_label(lg.spec)}, aux depth {lg.aux_depth}, {lg.params:,} parameters, "
        f"{lg.tensor_bytes:,} tensor bytes, sha256 `{lg.sha256[:16]}…`",
        f"- **Devices**: {', '.join(f'{p.name} ({p.source})' for p in profiles) or 'none'}",
        f"- **Benchmark results used**: {', '.join(have) or 'none yet'}"
        + (f"; missing: {', '.join(lacking)} (run `make bench`)" if lacking else ""),
        "",
    )
    for w in rep.result.warnings:
        rep.add(f"> {w}", "")


def latency_section(rep: Report, profiles: Sequence[Any], spec: ViTSpec) -> None:
    rep.add("## Latency vs depth per device", "")
    if not profiles:
        rep.add(f"_No device profile covers {spec_label(spec)}. Rebuild this report with `--device host`: it "
                "measures this machine for this architecture on first use (about a minute)._", "")
        rep.result.missing["latency"] = "tleg-deploy report --device host ..."
        return
    depths = list(range(1, rep.cfg.max_depth + 1))
    panels = []
    for p in profiles:
        lines = []
        for precision in p.precisions(spec):
            e = p.entry(spec, precision)
            f = e.fit.latency_p50
            fit = [max(f.value(d), 0.0) for d in depths]
            half = [f.half_width(d) for d in depths]
            pts = [pt for pt in e.points if pt.depth <= rep.cfg.max_depth]
            lines.append(plots.LatencyLine(
                precision=precision, depths=depths, fit_ms=fit,
                lower_ms=[max(v - h, 0.0) for v, h in zip(fit, half, strict=True)],
                upper_ms=[v + h for v, h in zip(fit, half, strict=True)],
                point_depths=[pt.depth for pt in pts], point_p50_ms=[pt.p50_ms for pt in pts],
                measured_range=(f.depth_min, f.depth_max)))
        panels.append(plots.DevicePanel(p.name, p.source, p.backend, lines))
    path = plots.plot_latency_vs_depth(panels, rep.fig_path("latency_vs_depth"), spec_label=spec_label(spec))
    rep.figure(path, "Latency vs depth per device")
    rep.add("| device | source | backend | precision | p50 = intercept + slope·depth | R² | leave-one-out error | "
            "profiled depths |", "|---|---|---|---|---|---:|---:|---|")
    for p in profiles:
        for precision in p.precisions(spec):
            e = p.entry(spec, precision)
            f = e.fit.latency_p50
            rep.add(f"| {p.name} | {p.source} | {p.backend} | {precision} | {f.intercept:.4g} + {f.slope:.4g}·depth "
                    f"ms | {f.r2:.4f} | {f.loo_error_rel:.1%} | {', '.join(map(str, e.depths))} |")
    rep.add("")
    for p in profiles:
        if p.source == "estimated":
            rep.add(f"- **{p.name} is estimated** (a roofline from datasheet figures, not a measurement). Measure the "
                    f"real device with: `{p.measure_command}`")
    rep.add("")


def budget_section(rep: Report, profiles: Sequence[Any], spec: ViTSpec) -> None:
    from tleg_deploy.errors import InfeasibleError
    from tleg_deploy.plan.solve import Budget, solve

    rep.add("## Deepest depth that fits common latency budgets", "",
            f"`solve` with a p90 latency budget: the upper end of the 95% prediction interval must fit; depths "
            f"searched 1-{rep.cfg.max_depth}, every precision the profile has.", "")
    if not profiles:
        rep.add("_No device profile covers this architecture (see above)._", "")
        return
    top = rep.cfg.max_depth
    for p in profiles:
        preds = [p.predict(d, spec=spec, precision=pr) for pr in p.precisions(spec) for d in (1, top)]
        lo = min(x.latency_p90_upper_ms for x in preds if x.depth == 1)
        hi = max(x.latency_p90_upper_ms for x in preds if x.depth == top)
        title = f"### {p.name} ({p.source}{', ' + p.backend if p.backend else ''})"
        rep.add(title, "", "| p90 budget | deepest depth | precision | predicted p90 (upper 95%) | peak memory | "
                "what stops a deeper one |", "|---:|---:|---|---:|---:|---|")
        for b in budget_ladder(max(lo, 1e-6), hi):
            try:
                plan = solve(p, Budget(latency_ms=b), spec=spec, max_depth=top)
            except InfeasibleError as e:
                rep.add(f"| {b:g} ms | none | - | - | - | {_cell(e.message)} |")
                continue
            c = plan.pick
            flag = " (extrapolated)" if c.extrapolated else ""
            why = f"max depth searched ({top})" if plan.binding == "max_depth" else _cell(plan.why_not_deeper)
            rep.add(f"| {b:g} ms | {c.depth}{flag} | {c.precision} | {c.latency_ms:.3g} ({c.latency_upper_ms:.3g}) ms "
                    f"| {c.memory_mb:.3g} MB | {why} |")
        rep.add("")
        if p.source == "estimated":
            rep.add(f"_Estimated profile: measure the real device with `{p.measure_command}`._", "")


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _lacks(e: Exception) -> str:
    return f"the results file lacks a field the report needs ({e})"


def prediction_section(rep: Report, results: Results) -> None:
    data = rep.open_section("Predicted vs measured latency", "predicted vs measured", results, "predictor_accuracy")
    if data is None:
        return
    panels, rows = [], []
    try:
        for r in data["results"]:
            pts = r["rows"]
            extra = ", ".join(f"{r[k]} {k}" for k in ("precision", "clock", "backend", "run") if k in r)
            label = f"{r['spec']} ({extra})" if extra else str(r["spec"])
            panels.append(plots.PredictionPanel(
                label=label, depths=[int(x["depth"]) for x in pts],
                measured_ms=[float(x["measured_p50_ms"]) for x in pts],
                predicted_ms=[float(x["predicted_p50_ms"]) for x in pts],
                fit_point=[bool(x.get("fit_point", False)) for x in pts]))
            rows.append(f"| {label} | {', '.join(map(str, r['fit_depths']))} | {r['within_5pct']:.0%} | "
                        f"{r['within_10pct']:.0%} | {r['median_abs_error']:.1%} | {r['max_abs_error']:.1%} | "
                        f"{r['interval_coverage']:.0%} |")
    except (KeyError, TypeError, ValueError) as e:
        rep.missing("predicted vs measured", results, "predictor_accuracy", _lacks(e))
        return
    if not panels:
        rep.missing("predicted vs measured", results, "predictor_accuracy", "the results file has no rows")
        return
    cfg = data.get("config", {})
    rep.figure(plots.plot_predicted_vs_measured(panels, rep.fig_path("predicted_vs_measured")),
               "Predicted vs measured latency")
    rep.add(f"ONNX Runtime CPU, {cfg.get('threads', '?')} thread(s), batch {cfg.get('batch', '?')}, "
            f"{cfg.get('precision', '?')}; fit from the listed depths, then every depth measured again. "
            f"Machine: {machine_line(data)}; load average before/after {cfg.get('load_average', '?')}.", "",
            "| spec | fit depths | within ±5% | within ±10% | median abs error | worst | in 95% interval |",
            "|---|---|---:|---:|---:|---:|---:|", *rows, "")


def solver_section(rep: Report, results: Results) -> None:
    data = rep.open_section("Does the solver's pick fit when measured?", "solver check", results, "solver")
    if data is None:
        return
    by_spec: dict[str, list[dict[str, Any]]] = {}
    try:
        for r in data["rows"]:
            if r.get("measured_p90_ms") is not None:
                by_spec.setdefault(str(r["spec"]), []).append(r)
        panels = [plots.SolverPanel(
            label=spec_name, budget_ms=[float(r["budget_ms"]) for r in rows],
            predicted_upper_ms=[float(r["predicted_p90_upper_ms"]) for r in rows],
            measured_ms=[float(r["measured_p90_ms"]) for r in rows],
            deeper_measured_ms=[float(r["deeper_measured_p90_ms"]) if r.get("deeper_measured_p90_ms") else None
                                for r in rows]) for spec_name, rows in by_spec.items()]
    except (KeyError, TypeError, ValueError) as e:
        rep.missing("solver check", results, "solver", _lacks(e))
        return
    if not panels:
        rep.missing("solver check", results, "solver", "the results file has no measured picks")
        return
    rep.figure(plots.plot_solver_check(panels, rep.fig_path("solver_check")), "Solver picks measured against budgets")
    s = data.get("summary", {})
    rep.add(f"`benchmarks/solver.py` solves a range of p90 budgets on a fresh host profile, then exports and measures "
            f"each pick and the next deeper depth. Picks measured within budget: {s.get('within', '?')}/"
            f"{s.get('n', '?')}; next deeper depth over budget: {s.get('tight', '?')}/{s.get('n_tight', '?')}. "
            f"Machine: {machine_line(data)}." + (f" Note: {data['note']}." if data.get("note") else ""), "")


def accuracy_section(rep: Report, results: Results) -> dict[str, dict[int, tuple[float, float]]] | None:
    data = rep.open_section("Accuracy vs depth per initialization", "accuracy vs depth", results, "paper_claims")
    if data is None:
        return None
    try:
        acc = accuracy_table(data)
    except ValueError as e:
        rep.missing("accuracy vs depth", results, "paper_claims", f"the results file is unusable: {e}")
        return None
    cfg = data.get("config", {}) if isinstance(data.get("config"), dict) else {}
    sub = (f"{PAPER_CLAIMS_SPEC}, {cfg.get('E', '?')} fine-tuning epochs, seeds {cfg.get('seeds', '?')}; "
           "error bars = std over seeds")
    rep.figure(plots.plot_accuracy_vs_depth(acc, rep.fig_path("accuracy_vs_depth"), subtitle=sub),
               "Accuracy vs depth per initialization")
    inits = list(acc)
    depths = sorted({d for a in acc.values() for d in a})
    rep.add(f"Test top-1 after the same fine-tuning budget ({sub}). Machine: {machine_line(data)}.", "",
            "| depth | " + " | ".join(inits) + " |", "|---:|" + "---:|" * len(inits))
    for d in depths:
        cells = [f"{acc[i][d][0]:.3f} ± {acc[i][d][1]:.3f}" if d in acc[i] else "-" for i in inits]
        rep.add(f"| {d} | " + " | ".join(cells) + " |")
    rep.add("")
    return acc


def tradeoff_section(rep: Report, results: Results, acc: dict[str, dict[int, tuple[float, float]]] | None,
                     profiles: Sequence[Any], spec: ViTSpec) -> None:
    from tleg_deploy.errors import InfeasibleError
    from tleg_deploy.plan.solve import Budget, solve

    rep.add("## Accuracy vs latency, with the budget and the Pareto front", "")
    if acc is None:
        rep.missing("accuracy vs latency", results, "paper_claims", "there is no accuracy table yet")
        return
    data = results.get("paper_claims") or {}
    acc_spec = str(data.get("spec") or PAPER_CLAIMS_SPEC)
    if spec.preset_name() != acc_spec:
        rep.add(f"_The accuracy table was measured on {acc_spec}, the learngene here is {spec_label(spec)}: "
                f"rebuild the report with `--learngene demo` to pair them._", "")
        return
    if not profiles:
        rep.add("_No device profile covers this architecture (see above)._", "")
        return
    panels = []
    notes = []
    tleg = acc.get("tleg", next(iter(acc.values())))
    for p in profiles:
        precision = p.precisions(spec)[0]

        def lat(d: int, p: Any = p, precision: str = precision) -> float:
            return float(p.predict(d, spec=spec, precision=precision).latency_p90_upper_ms)

        points = {init: [(d, lat(d), m) for d, (m, _) in sorted(table.items())]
                  for init, table in acc.items()}
        tleg_pts = [(d, lat(d), m) for d, (m, _) in sorted(tleg.items())]
        budget = rep.cfg.latency_ms or nice_budget(math.sqrt(tleg_pts[0][1] * tleg_pts[-1][1]))
        pick = None
        try:
            plan = solve(p, Budget(latency_ms=budget), spec=spec, precisions=[precision], objective="accuracy",
                         accuracy={d: m for d, (m, _) in tleg.items()}, max_depth=max(tleg))
            pick = next(q for q in tleg_pts if q[0] == plan.depth)
            notes.append(f"- {p.name} ({p.source}), budget {budget:g} ms at {precision}: the most accurate fitting "
                         f"depth is **{plan.depth}** ({pick[2]:.1%} test top-1, {pick[1]:.3g} ms upper p90).")
        except InfeasibleError as e:
            notes.append(f"- {p.name} ({p.source}), budget {budget:g} ms at {precision}: nothing fits ({e.message}).")
        panels.append(plots.TradeoffPanel(p.name, p.source, precision, points, plots.pareto_front(tleg_pts),
                                          budget, pick))
    rep.figure(plots.plot_accuracy_vs_latency(panels, rep.fig_path("accuracy_vs_latency")),
               "Accuracy vs latency per device")
    how = (f"{rep.cfg.latency_ms:g} ms (--latency)" if rep.cfg.latency_ms else
           "per device, the 1-2-5 value nearest the geometric middle of its range (set one with --latency)")
    rep.add(f"x: the upper end of the 95% interval of the predicted p90 latency (what `solve` compares with a "
            f"budget); y: test top-1 from paper_claims. Budget: {how}. The Pareto front joins the tleg depths that "
            "no other tleg depth beats on both latency and accuracy.", "", *notes, "")


def storage_section(rep: Report, lg: LearngeneFacts, results: Results,
                     family: tuple[int, dict[int, int]] | None) -> None:
    rep.add("## Storage: the learngene vs the family it replaces", "")
    if family is not None:
        lg_bytes, members = family
        source = f"fp32 ONNX files of the exported family in {rep.cfg.family}"
    else:
        members = {d: costs.artifact_bytes(lg.spec, d, "fp32") for d in STORAGE_DEPTHS}
        lg_bytes = lg.tensor_bytes
        source = "fp32 weights counted by costs.py; learngene tensor bytes"
    rep.figure(plots.plot_storage(lg_bytes, members, rep.fig_path("storage"), source=source),
               "Storage of the learngene vs the family")
    total = sum(members.values())
    rep.add(f"Learngene: {lg_bytes:,} bytes. Descendants {min(members)}-{max(members)} stored separately: "
            f"{total:,} bytes, **{total / lg_bytes:.1f}x** ({source}).")
    data = results.get("paper_claims")
    st = data.get("storage") if data else None
    if isinstance(st, dict) and "ratio_bytes" in st:
        rep.add(f"The paper_claims benchmark measured {st.get('descendants_bytes', 0):,} bytes of descendant "
                f"safetensors files vs a {st.get('learngene_bytes', 0):,}-byte learngene file: "
                f"{float(st['ratio_bytes']):.1f}x (paper: about 19x fewer parameters at DeiT scale).")
    rep.add("")


def details_section(rep: Report, results: Results) -> None:
    sections = [n for n in BENCHMARKS if (results.directory / f"{n}.md").is_file()]
    rep.add("## Benchmark details", "")
    if not sections:
        rep.add("_No benchmark has been run yet: `make bench` runs them all and writes benchmarks/RESULTS.md._", "")
        return
    rep.add(f"Each benchmark's own summary from `{results.directory}` (the same text as benchmarks/RESULTS.md).", "")
    for n in sections:
        text = (results.directory / f"{n}.md").read_text(encoding="utf-8")
        for line in text.splitlines():  # one heading level down, under this section
            rep.add("#" + line if line.startswith("#") else line)
        rep.add("")
