"""The report's figures: plain data in, one PNG out (matplotlib, Agg backend, written atomically).

Each function takes already-computed numbers (``build.py`` gathers them from profiles, benchmark
results and manifests), so a plot never decides what the data are, only how they look: a title, axis
labels with units, a legend, and for estimated device profiles the word "estimated" in the title and
hollow markers, so a roofline is never mistaken for a measurement. matplotlib is imported inside the
functions (DESIGN.md §2: heavy optional imports stay out of ``import tleg_deploy``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tleg_deploy.errors import TlegError
from tleg_deploy.files.fileio import atomic_path

DPI = 110
PRECISION_COLORS = {"fp32": "tab:blue", "fp16": "tab:green", "int8": "tab:orange"}
INIT_COLORS = {"tleg": "tab:red", "scratch": "tab:gray", "weight-selection": "tab:blue", "base-only": "tab:purple"}


# -- plain data the plots take ---------------------------------------------------------------------
@dataclass(frozen=True)
class LatencyLine:
    """One precision on one device: the fitted p50 line with its 95% band over ``depths``, and the
    profile's own (measured or estimated) points."""

    precision: str
    depths: Sequence[int]
    fit_ms: Sequence[float]
    lower_ms: Sequence[float]
    upper_ms: Sequence[float]
    point_depths: Sequence[int]
    point_p50_ms: Sequence[float]
    measured_range: tuple[int, int]


@dataclass(frozen=True)
class DevicePanel:
    device: str
    source: str                      # "measured" | "estimated"
    backend: str
    lines: Sequence[LatencyLine]


@dataclass(frozen=True)
class PredictionPanel:
    """Predicted vs measured p50 of one architecture (predictor_accuracy benchmark)."""

    label: str
    depths: Sequence[int]
    measured_ms: Sequence[float]
    predicted_ms: Sequence[float]
    fit_point: Sequence[bool]


@dataclass(frozen=True)
class TradeoffPanel:
    """Accuracy vs predicted latency on one device; ``points[init] = [(depth, latency_ms, acc), ...]``."""

    device: str
    source: str
    precision: str
    points: Mapping[str, Sequence[tuple[int, float, float]]]
    pareto: Sequence[tuple[int, float, float]]
    budget_ms: float | None
    pick: tuple[int, float, float] | None = None


# -- helpers ------------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise TlegError("the report needs matplotlib", hint="pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    return path


def _grid(n: int, ncols: int = 2) -> tuple[int, int]:
    cols = 1 if n == 1 else ncols
    return math.ceil(n / cols), cols


def _axes(plt: Any, n: int, *, width: float = 11.0, height: float = 3.9, ncols: int = 2) -> tuple[Any, list[Any]]:
    rows, cols = _grid(n, ncols)
    fig, axes = plt.subplots(rows, cols, figsize=(width if cols > 1 else width * 0.6, height * rows),
                             squeeze=False, layout="constrained")
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def device_title(device: str, source: str, backend: str = "") -> str:
    what = "ESTIMATED (roofline, not measured)" if source == "estimated" else "measured"
    return f"{device}{f' ({backend})' if backend else ''}\n{what}"


def pareto_front(points: Sequence[tuple[int, float, float]]) -> list[tuple[int, float, float]]:
    """Points (depth, latency, accuracy) no other point beats on both: lower latency and higher accuracy."""
    front: list[tuple[int, float, float]] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p[1], -p[2])):
        if p[2] > best:
            front.append(p)
            best = p[2]
    return front


# -- the figures ----------------------------------------------------------------------------------
def plot_latency_vs_depth(panels: Sequence[DevicePanel], path: Path, *, spec_label: str) -> Path:
    """One panel per device: fitted p50 line (dotted where extrapolated), 95% band, profile points."""
    plt = _pyplot()
    fig, axes = _axes(plt, len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        estimated = panel.source == "estimated"
        for k, line in enumerate(panel.lines):
            # Later precisions drawn thinner and smaller: where two precisions coincide, both stay visible.
            color = PRECISION_COLORS.get(line.precision, "black")
            lo, hi = line.measured_range
            inside = [i for i, d in enumerate(line.depths) if lo <= d <= hi]
            ax.fill_between(line.depths, line.lower_ms, line.upper_ms, color=color, alpha=0.12, linewidth=0)
            ax.plot(line.depths, line.fit_ms, color=color, linestyle=":", linewidth=1.2)
            if inside:
                ax.plot([line.depths[i] for i in inside], [line.fit_ms[i] for i in inside], color=color,
                        linewidth=max(2.6 - 0.8 * k, 1.0), label=f"{line.precision} fitted p50 (95% band)")
            kind = "estimated" if estimated else "measured"
            ax.plot(line.point_depths, line.point_p50_ms, linestyle="none", marker="o", markersize=max(8 - 2.5 * k, 4),
                    color=color, markerfacecolor="white" if estimated else color,
                    label=f"{line.precision} {kind} points")
        ax.set_title(device_title(panel.device, panel.source, panel.backend), fontsize=10)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("latency p50 (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left")
    fig.suptitle(f"Latency vs depth, {spec_label}, batch 1 (dotted: extrapolated beyond the profiled depths)",
                 fontsize=11)
    return _save(fig, path)


def plot_predicted_vs_measured(panels: Sequence[PredictionPanel], path: Path) -> Path:
    """Measured p50 against the 3-depth fit's prediction; the ±5% band around y = x."""
    plt = _pyplot()
    fig, axes = _axes(plt, len(panels), height=4.4)
    for ax, p in zip(axes, panels, strict=True):
        top = max(max(p.measured_ms), max(p.predicted_ms)) * 1.08
        lo = min(min(p.measured_ms), min(p.predicted_ms)) * 0.92
        xs = [lo, top]
        ax.fill_between(xs, [x * 0.95 for x in xs], [x * 1.05 for x in xs], color="tab:green", alpha=0.15,
                        label="within ±5%")
        ax.plot(xs, xs, color="black", linewidth=0.8, label="predicted = measured")
        other = [i for i, f in enumerate(p.fit_point) if not f]
        fit = [i for i, f in enumerate(p.fit_point) if f]
        ax.scatter([p.measured_ms[i] for i in other], [p.predicted_ms[i] for i in other], s=18, color="tab:blue",
                   label="held-out depths", zorder=3)
        ax.scatter([p.measured_ms[i] for i in fit], [p.predicted_ms[i] for i in fit], s=50, marker="s",
                   facecolor="none", edgecolor="tab:red", label="depths the fit used", zorder=4)
        errs = [abs(pr - m) / m for pr, m in zip(p.predicted_ms, p.measured_ms, strict=True)]
        share = sum(e <= 0.05 for e in errs) / len(errs)
        ax.set_title(f"{p.label}: {share:.0%} of depths {min(p.depths)}-{max(p.depths)} within ±5%", fontsize=10)
        ax.set_xlim(lo, top)
        ax.set_ylim(lo, top)
        ax.set_xlabel("measured latency p50 (ms)")
        ax.set_ylabel("predicted latency p50 (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Predicted vs measured latency (fit from 3 depths, every depth measured again)", fontsize=11)
    return _save(fig, path)


def plot_accuracy_vs_depth(accuracy: Mapping[str, Mapping[int, tuple[float, float]]], path: Path, *,
                           subtitle: str = "") -> Path:
    """Mean test top-1 per depth for each initialization; error bars = std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
    inits = list(accuracy)
    offsets = {init: (k - (len(inits) - 1) / 2) * 0.09 for k, init in enumerate(inits)}
    for init in inits:
        depths = sorted(accuracy[init])
        means = [accuracy[init][d][0] * 100 for d in depths]
        stds = [accuracy[init][d][1] * 100 for d in depths]
        ax.errorbar([d + offsets[init] for d in depths], means, yerr=stds, marker="o", markersize=4, capsize=3,
                    linewidth=1.5 if init == "tleg" else 1.0, color=INIT_COLORS.get(init), label=init)
    all_depths = sorted({d for acc in accuracy.values() for d in acc})
    ax.set_xticks(all_depths)
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title("Accuracy vs depth per initialization" + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(title="initialization", fontsize=8.5, loc="lower right")
    return _save(fig, path)


def plot_accuracy_vs_latency(panels: Sequence[TradeoffPanel], path: Path) -> Path:
    """Per device: accuracy against predicted latency per depth, the tleg Pareto front and the budget
    (its value and the best fitting depth in each panel's title); one legend for all panels, below them."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    fig, axes = _axes(plt, len(panels), height=4.2)
    inits: dict[str, None] = {}
    for ax, p in zip(axes, panels, strict=True):
        hollow = p.source == "estimated"
        for init, pts in p.points.items():
            if not pts:
                continue
            inits[init] = None
            color = INIT_COLORS.get(init, "black")
            ax.scatter([q[1] for q in pts], [q[2] * 100 for q in pts], s=22 if init == "tleg" else 14,
                       facecolor="white" if hollow else color, edgecolor=color, zorder=3,
                       alpha=1.0 if init == "tleg" else 0.7)
        if p.pareto:
            ax.step([q[1] for q in p.pareto], [q[2] * 100 for q in p.pareto], where="post", color="tab:red",
                    linewidth=1.2, alpha=0.8)
            for q in (p.pareto[0], p.pareto[-1]):
                ax.annotate(f"d={q[0]}", (q[1], q[2] * 100), textcoords="offset points", xytext=(4, -11),
                            fontsize=7.5, color="tab:red")
        if p.budget_ms is not None:
            ax.axvline(p.budget_ms, color="black", linestyle="--", linewidth=1.0)
        if p.pick is not None:
            ax.scatter([p.pick[1]], [p.pick[2] * 100], s=140, marker="*", color="gold", edgecolor="black", zorder=5)
        budget = "" if p.budget_ms is None else f"budget {p.budget_ms:g} ms: " + (
            f"depth {p.pick[0]} ({p.pick[2]:.1%})" if p.pick is not None else "nothing fits")
        ax.set_title(device_title(p.device, p.source) + (f"; {budget}" if budget else ""), fontsize=10)
        ax.set_xlabel(f"predicted p90 latency at {p.precision}, upper 95% bound (ms)")
        ax.set_ylabel("test top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], linestyle="none", marker="o", color=INIT_COLORS.get(i, "black"), label=i) for i in inits]
    handles += [Line2D([], [], color="tab:red", label="tleg Pareto front"),
                Line2D([], [], color="black", linestyle="--", label="latency budget (p90, upper 95% bound)"),
                Line2D([], [], linestyle="none", marker="*", markersize=12, color="gold", markeredgecolor="black",
                       label="most accurate depth within budget")]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=8.5,
               title="filled markers: measured device; hollow: estimated profile", title_fontsize=8.5)
    fig.suptitle("Accuracy vs latency per device (accuracy measured in PyTorch fp32; latency from the profile)",
                 fontsize=11)
    return _save(fig, path)


def _unit(nbytes: float) -> tuple[float, str]:
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if nbytes >= scale:
            return scale, name
    return 1.0, "bytes"


def plot_storage(learngene_bytes: int, member_bytes: Mapping[int, int], path: Path, *, source: str) -> Path:
    """Bytes of each descendant, the running total of the family, and the learngene as one line."""
    plt = _pyplot()
    depths = sorted(member_bytes)
    total = 0
    cumulative = []
    for d in depths:
        total += member_bytes[d]
        cumulative.append(total)
    scale, unit = _unit(max(cumulative))
    fig, ax = plt.subplots(figsize=(8.5, 4.6), layout="constrained")
    ax.bar(depths, [member_bytes[d] / scale for d in depths], color="tab:blue", alpha=0.6,
           label="one descendant of that depth")
    ratio = total / learngene_bytes
    ax.plot(depths, [c / scale for c in cumulative], marker="o", markersize=4, color="tab:orange",
            label=f"family total, depths {depths[0]}..d (all {len(depths)}: {total / scale:.3g} {unit} = "
                  f"{ratio:.1f}x the learngene)")
    ax.axhline(learngene_bytes / scale, color="tab:red", linewidth=1.6,
               label=f"learngene ({learngene_bytes / scale:.3g} {unit})")
    ax.set_xticks(depths)
    ax.set_xlabel("depth (blocks)")
    ax.set_ylabel(f"size ({unit})")
    ax.set_title(f"Storage: one learngene vs the family of descendants {depths[0]}-{depths[-1]}\n({source})",
                 fontsize=11)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8.5, loc="upper left")
    return _save(fig, path)


@dataclass(frozen=True)
class SolverPanel:
    """The solver benchmark on one architecture: per budget, the pick's predicted (upper) and measured p90, and
    the measured p90 of the next deeper depth (None where not measured)."""

    label: str
    budget_ms: Sequence[float]
    predicted_upper_ms: Sequence[float]
    measured_ms: Sequence[float]
    deeper_measured_ms: Sequence[float | None]


def plot_solver_check(panels: Sequence[SolverPanel], path: Path) -> Path:
    """Measured p90 of each pick against its budget: below the diagonal = the pick fits."""
    plt = _pyplot()
    fig, axes = _axes(plt, len(panels), height=4.4)
    for ax, p in zip(axes, panels, strict=True):
        vals = [*p.budget_ms, *p.measured_ms, *p.predicted_upper_ms, *(v for v in p.deeper_measured_ms if v)]
        lo, hi = min(vals) * 0.8, max(vals) * 1.25
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="latency = budget")
        ax.fill_between([lo, hi], [lo, lo], [lo, hi], color="tab:green", alpha=0.08, label="fits (below)")
        ax.scatter(p.budget_ms, p.predicted_upper_ms, marker="_", s=90, color="tab:gray",
                   label="pick: predicted p90, upper 95%")
        ax.scatter(p.budget_ms, p.measured_ms, s=22, color="tab:blue", zorder=3, label="pick: measured p90")
        deeper = [(b, v) for b, v in zip(p.budget_ms, p.deeper_measured_ms, strict=True) if v]
        if deeper:
            ax.scatter([b for b, _ in deeper], [v for _, v in deeper], s=22, marker="x", color="tab:red", zorder=3,
                       label="next deeper depth: measured p90")
        within = sum(m <= b for m, b in zip(p.measured_ms, p.budget_ms, strict=True))
        ax.set_title(f"{p.label}: {within}/{len(p.budget_ms)} picks measured within budget", fontsize=10)
        _log_axes(ax)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("p90 latency budget (ms)")
        ax.set_ylabel("p90 latency (ms)")
        ax.grid(alpha=0.3, which="major")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8.5)
    fig.suptitle("Does the solver's pick fit when measured? (this machine, ONNX Runtime CPU)", fontsize=11)
    return _save(fig, path)


def _log_axes(ax: Any) -> None:
    """Log scales with plain tick labels at 1, 2, 5 x 10^k (not 3 x 10^0)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
