"""The report's "Your fits" section (``tleg-deploy report --fit DIR``): for each directory ``fit``
wrote, the device, the pick, predicted vs measured latency, the fine-tuning accuracy, precisions
rejected by validation, the classes and the artifacts. Reads ``plan.json``, ``manifest.json`` and
``labels.json`` only; torch-free. Also the check that benchmark results belong to the learngene
reported on (``results_learngene``), so the demo's accuracies never appear under another name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tleg_deploy.errors import TlegError
from tleg_deploy.plan.units import format_metrics

FIT_FORMAT = "tleg-fit"  # plan.json's format (deploy.fit_types.FIT_FORMAT; report sits beside deploy, not above)

if TYPE_CHECKING:
    from tleg_deploy.report.build import Report
    from tleg_deploy.report.inputs import Results


@dataclass(frozen=True)
class FitFacts:
    directory: Path
    plan: dict[str, Any]
    manifest: dict[str, Any]
    labels: dict[str, Any] | None

    @property
    def learngene_sha256(self) -> str:
        return str(self.manifest.get("learngene", {}).get("sha256", ""))

    @property
    def learngene_file(self) -> str | None:
        f = self.manifest.get("learngene", {}).get("file")
        return str(f) if f else None


def load_fit(directory: str | Path) -> FitFacts:
    """A ``fit`` output directory's plan, manifest and labels; ``TlegError`` if it is not one."""
    d = Path(directory)
    plan, manifest = _json(d / "plan.json"), _json(d / "manifest.json")
    if not isinstance(plan, dict) or plan.get("format") != FIT_FORMAT or not isinstance(manifest, dict):
        raise TlegError(f"{str(d)!r} is not a fit output directory (no readable plan.json and manifest.json)",
                        hint="pass a directory written by tleg-deploy fit")
    labels = _json(d / "labels.json")
    return FitFacts(d, plan, manifest, labels if isinstance(labels, dict) else None)


def results_learngene(results: Results) -> str | None:
    """The sha256 of the learngene the benchmark results were made for (``paper_claims``), if recorded."""
    claims = results.get("paper_claims") or {}
    lg = claims.get("learngene")
    sha = lg.get("sha256") if isinstance(lg, dict) else None
    return str(sha) if sha else None


def fits_section(rep: Report, fits: Sequence[FitFacts], learngene_sha256: str) -> None:
    """One subsection per fit: what was picked, predicted vs measured, accuracy, artifacts."""
    if not fits:
        return
    rep.add("## Your fits", "")
    for f in fits:
        p = f.plan
        pick, budget = p.get("pick", {}), p.get("plan", {}).get("budget", {})
        pct = budget.get("percentile", "p90")
        rep.add(f"### `{f.directory}`: {p.get('device')}, depth {p.get('depth')} {p.get('precision')}", "")
        if f.learngene_sha256 and f.learngene_sha256 != learngene_sha256:
            rep.add(f"> made from another learngene (sha256 `{f.learngene_sha256[:16]}…`) than this report's", "")
        measured = p.get("measured") or {}
        meas = f"{measured[pct + '_ms']:.3g} ms" if f"{pct}_ms" in measured else f"not measured ({p.get('figures')})"
        limit, memory = budget.get("latency_ms"), budget.get("memory_mb")
        rep.add("| figure | predicted (95% upper) | measured | budget |", "|---|---|---|---|",
                f"| latency {pct} | {pick.get('latency_ms', float('nan')):.3g} ms "
                f"({pick.get('latency_upper_ms', float('nan')):.3g}) | {meas} | "
                f"{'-' if limit is None else f'{limit:g} ms'} |",
                f"| peak memory | {pick.get('memory_mb', float('nan')):.1f} MB | not measured | "
                f"{'-' if memory is None else f'{memory:g} MB'} |", "")
        lines = []
        if p.get("finetune"):
            lines.append(f"- Fine-tuned: {format_metrics(p['finetune'])}")
        else:
            lines.append("- Accuracy: not measured by fit (no fine-tuning); the expansion was validated against "
                         "PyTorch")
        for step in p.get("steps", []):
            lines.append(f"- Measured step: {step}")
        for why in (p.get("rejected_precisions") or {}).values():
            lines.append(f"- Precision {why}")
        if f.labels is not None:
            classes = f.labels.get("classes", [])
            lines.append(f"- Classes ({len(classes)}): {', '.join(map(str, classes[:10]))}"
                         f"{', ...' if len(classes) > 10 else ''}; preprocessing in `labels.json`")
        arts = [a for a in f.manifest.get("artifacts", []) if isinstance(a, dict)]
        lines.append("- Artifacts: " + ", ".join(f"`{a.get('file')}` ({a.get('bytes', 0) / 1e6:.2f} MB)"
                                                  for a in arts))
        rep.add(*lines, "")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
