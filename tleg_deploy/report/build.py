"""``build_report``: the whole story of a learngene's deployment on one page (issue 7).

Sections (``sections.py``), each from data that came from a run: latency vs depth per device
(profiles), the deepest depth that fits common latency budgets per device (``solve``), predicted vs
measured latency (``benchmarks/predictor_accuracy.py``), the solver's picks measured
(``benchmarks/solver.py``), accuracy vs depth per initialization and accuracy vs latency with the
budget and the Pareto front (``benchmarks/paper_claims.py``), and the storage of the learngene vs
its family (an export manifest, else ``costs.py``), and the user's fits (``fits.py``, ``--fit``). A
section whose input is missing says which command produces it. Benchmark results are used only when
made for the learngene reported on (``results_dir`` None: omitted, with a note; results of another
learngene: refused). Writes ``report.md``, ``figures/*.png`` and a self-contained ``report.html``
(images inlined), each file atomically, and ``.tleg-report.json``, the record of those files: a
re-run replaces only recorded files (so a user's ``report.md`` is never overwritten without
``force``), and removes a recorded figure that this build has no data for (``files.outputs``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tleg_deploy.errors import OutputError, TlegError, UnitError
from tleg_deploy.files.fileio import write_json_atomic, write_text_atomic
from tleg_deploy.files.outputs import FORCE_HINT, has_marker, make_dir, output_dir
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.report import sections
from tleg_deploy.report.fits import fits_section, load_fit, results_learngene
from tleg_deploy.report.inputs import Results, bench_command, learngene_facts, load_results, spec_label

Progress = Callable[[str], None]
FIGURES = "figures"
FIGURE_NAMES = ("latency_vs_depth", "predicted_vs_measured", "solver_check", "accuracy_vs_depth",
                "accuracy_vs_latency", "storage")
RECORD = ".tleg-report.json"
RECORD_FORMAT = "tleg-report"
OMITTED = "benchmark results (made for tleg-deploy's demo learngene) are left out for this learngene"


@dataclass(frozen=True)
class ReportConfig:
    """What to report on: the benchmark results in ``results_dir`` (``<name>.json`` as the scripts in
    ``benchmarks/`` write them). ``devices`` empty = every profile ``tleg-deploy devices`` lists (a cached
    host measurement included, none made); ``latency_ms`` None = a budget per device in the middle of its range."""

    out_dir: Path
    results_dir: Path | None  # None: no benchmark results (the sections say so)
    devices: tuple[str, ...] = ()
    learngene: str = "demo"
    family: Path | None = None
    latency_ms: float | None = None
    max_depth: int = 24
    force: bool = False  # replace report files tleg-deploy has no record of writing
    fits: tuple[Path, ...] = ()  # directories written by ``fit``, shown in "Your fits"

    def __post_init__(self) -> None:
        check_depth(self.max_depth, maximum=MAX_DEPTH)
        if self.latency_ms is not None and not (math.isfinite(self.latency_ms) and self.latency_ms > 0):
            raise UnitError(f"latency budget {self.latency_ms!r} ms must be a positive number")


@dataclass
class ReportResult:
    out_dir: Path
    markdown: Path
    html: Path
    figures: list[Path] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)    # section -> the command that fills it
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "markdown": str(self.markdown), "html": str(self.html),
                "figures": [str(p) for p in self.figures], "missing": self.missing, "warnings": self.warnings}


class Report:
    """Collects markdown lines and figures while the sections are built."""

    def __init__(self, cfg: ReportConfig, progress: Progress | None) -> None:
        self.cfg = cfg
        self.lines: list[str] = []
        self.result = ReportResult(cfg.out_dir, cfg.out_dir / "report.md", cfg.out_dir / "report.html")
        self._progress = progress

    def step(self, msg: str) -> None:
        if self._progress is not None:
            self._progress(msg)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, path: Path, alt: str) -> None:
        self.result.figures.append(path)
        self.add(f"![{alt}]({FIGURES}/{path.name})", "")

    def fig_path(self, name: str) -> Path:
        return self.cfg.out_dir / FIGURES / f"{name}.png"

    def missing(self, section: str, results: Results, name: str, why: str = "") -> None:
        if self.cfg.results_dir is None:  # omitted on purpose: the benchmarks exist for the demo learngene only
            self.add(f"_Not in this report: {OMITTED}._", "")
            return
        self.result.missing[section] = bench_command(name)
        self.add(results.missing(name, why), "")

    def open_section(self, heading: str, section: str, results: Results, name: str) -> dict[str, Any] | None:
        """Start a section fed by benchmark ``name``: its results, or ``None`` once the section says which
        command produces them."""
        self.add(f"## {heading}", "")
        data = results.get(name)
        if data is None:
            self.missing(section, results, name)
        return data


def _profiles(cfg: ReportConfig, spec: ViTSpec, quiet: bool) -> list[Any]:
    from tleg_deploy.profile.registry import for_spec, list_profiles, resolve_profile

    if cfg.devices:  # "host" is measured here on first use (with progress unless quiet)
        return [resolve_profile(name, spec=spec, quiet=quiet) for name in cfg.devices]
    # Every listed profile; an estimated one also answers for a spec it did not ship with (computed
    # from its datasheets, as `fit` does); a measured one only for what was measured.
    return [for_spec(p, spec) for p in list_profiles()]


def _probed(rep: Report, profile: Any) -> Any:
    """A cached measured profile of this host, probed for drift (about a second; ``profile.drift``) as fit and
    solve probe it: the report says the drift, and beyond the threshold its predictions are rescaled."""
    from tleg_deploy.profile import drift

    if drift.check_probe(profile) is not None:  # estimated, another host's, or without a reference: as it is
        return profile
    rep.step(f"drift probe of {profile.name}")
    reading = drift.probe(profile)
    rep.result.warnings.append(reading.message)
    return drift.apply(profile, reading)


def build_report(cfg: ReportConfig, *, progress: Progress | None = None, quiet: bool = True) -> ReportResult:
    """Build the report into ``cfg.out_dir`` (see the module docstring). ``progress`` is told each step;
    ``quiet=False`` shows the progress bars of a host measurement, if one is needed."""
    owned = _check_outputs(cfg)
    rep = Report(cfg, progress)
    manifest = _family_members(cfg.family) if cfg.family is not None else None  # a bad --family fails first
    fits = [load_fit(d) for d in cfg.fits]
    rep.step("reading the learngene")
    lg = learngene_facts(cfg.learngene)
    spec = lg.spec
    results = load_results(cfg.results_dir) if cfg.results_dir is not None else Results(Path("-"), {}, {})
    made_for = results_learngene(results)
    if made_for is not None and made_for != lg.sha256:
        raise TlegError(f"the results in {str(cfg.results_dir)!r} were made for learngene {made_for[:12]}…, not "
                        f"{lg.label} ({lg.sha256[:12]}…)", hint="leave --results out, or point it at results "
                                                                "made for this learngene")
    if cfg.results_dir is None:
        rep.result.warnings.append(f"{OMITTED} (--results DIR adds results made for it)")
    rep.step("resolving device profiles")
    profiles = [_probed(rep, p) for p in _profiles(cfg, spec, quiet)]
    covered = [p for p in profiles if p.precisions(spec)]
    for p in profiles:
        if not p.precisions(spec):
            rep.result.warnings.append(f"profile {p.name!r} has no entry for {spec_label(spec)}; measure it with: "
                                       f"{p.measure_command}")

    # Claim every name this build may write before writing any (all inputs are read by now), so an
    # interrupted build leaves a directory the next run recognizes as ours (narrowed at the end).
    _write_record(cfg, {*owned, "report.md", "report.html", *(f"{FIGURES}/{n}.png" for n in FIGURE_NAMES)})
    sections.header(rep, lg, results, profiles)
    rep.step("plotting latency vs depth")
    sections.latency_section(rep, covered, spec)
    rep.step("solving common budgets")
    sections.budget_section(rep, covered, spec)
    rep.step("plotting predicted vs measured latency")
    sections.prediction_section(rep, results)
    rep.step("plotting the solver check")
    sections.solver_section(rep, results)
    rep.step("plotting accuracy")
    acc = sections.accuracy_section(rep, results)
    sections.tradeoff_section(rep, results, acc, covered, spec)
    rep.step("plotting storage")
    sections.storage_section(rep, lg, results, manifest)
    sections.details_section(rep, results)
    fits_section(rep, fits, lg.sha256)

    rep.step("writing report.md and report.html")
    from tleg_deploy.report.html import markdown_to_html

    text = "\n".join(rep.lines).rstrip() + "\n"
    write_text_atomic(rep.result.markdown, text)
    write_text_atomic(rep.result.html, markdown_to_html(text, base_dir=cfg.out_dir, title="tleg-deploy report"))
    for name in FIGURE_NAMES:  # a figure of an earlier build whose data is gone now would mislead
        stale = rep.fig_path(name)
        if stale not in rep.result.figures and _rel(cfg, stale) in owned and stale.is_file():
            stale.unlink()
    written = [rep.result.markdown, rep.result.html, *rep.result.figures]
    _write_record(cfg, {_rel(cfg, p) for p in written})
    return rep.result


def _write_record(cfg: ReportConfig, files: set[str]) -> None:
    make_dir(cfg.out_dir)
    write_json_atomic(cfg.out_dir / RECORD, {"format": RECORD_FORMAT, "schema_version": "1", "files": sorted(files)})


def check_report_dir(out: str | os.PathLike[str], *, inputs: Iterable[Any] = (), force: bool = False) -> Path:
    """Where a report may go (``files.outputs``): a new or empty directory, an earlier report's
    (it has ``.tleg-report.json``), or with ``force`` any directory; never one holding an input."""
    return output_dir(out, inputs=inputs, force=force, ours=lambda d: has_marker(d, RECORD, RECORD_FORMAT))


def _check_outputs(cfg: ReportConfig) -> set[str]:
    """Refuse, before any work, to replace a report file we have no record of writing (unless
    ``cfg.force``); the recorded files, which may be replaced."""
    from tleg_deploy.model.resources import learngene_path

    check_report_dir(cfg.out_dir, inputs=[learngene_path(cfg.learngene), cfg.family, cfg.results_dir, *cfg.fits],
                     force=cfg.force)
    owned: set[str] = set()
    if has_marker(cfg.out_dir, RECORD, RECORD_FORMAT):
        files = json.loads((cfg.out_dir / RECORD).read_text(encoding="utf-8")).get("files")
        owned = {str(f) for f in files} if isinstance(files, list) else set()
    if os.path.lexists(cfg.out_dir / FIGURES) and not (cfg.out_dir / FIGURES).is_dir():
        raise OutputError(f"{cfg.out_dir / FIGURES} is not a directory, where the report puts its figures",
                          hint=f"move it out of {cfg.out_dir}")
    for rel in ("report.md", "report.html", *(f"{FIGURES}/{n}.png" for n in FIGURE_NAMES)):
        path = cfg.out_dir / rel
        if os.path.lexists(path) and not path.is_file():
            raise OutputError(f"{path} is not a regular file, where the report writes one",
                              hint=f"move it out of {cfg.out_dir}")
        if path.is_file() and rel not in owned and not cfg.force:
            raise OutputError(f"{path} already exists and was not written by tleg-deploy report", hint=FORCE_HINT)
    return owned


def _rel(cfg: ReportConfig, path: Path) -> str:
    return path.relative_to(cfg.out_dir).as_posix()


def _family_members(family: Path) -> tuple[int, dict[int, int]]:
    """(learngene bytes, {depth: fp32 ONNX bytes}) from an export-family manifest."""
    from tleg_deploy.export.manifest import load_manifest

    manifest = load_manifest(family)
    if manifest is None:
        raise TlegError(f"no manifest.json in {str(family)!r}",
                        hint="point --family at a directory written by tleg-deploy export-family")
    members = {int(a["depth"]): int(a["bytes"]) for a in manifest["artifacts"]
               if a.get("precision") == "fp32" and a.get("format") == "onnx"}
    if not members:
        raise TlegError(f"the manifest in {str(family)!r} lists no fp32 ONNX member",
                        hint="export the family with --format onnx")
    return int(manifest["storage"].get("learngene_bytes") or manifest["learngene"]["tensor_bytes"]), members


