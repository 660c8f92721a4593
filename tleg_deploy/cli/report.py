"""``tleg-deploy report``: figures and tables of the whole story, as report.md and one report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tleg_deploy.cli.app import ForceOpt, JsonOpt, QuietOpt, command, emit_json, err, out

# Where `make bench` writes the benchmark results, relative to the working directory (a checkout); used
# by default only when it exists and its results were made for the learngene reported on.
DEFAULT_RESULTS = Path("benchmarks/results")


@command()
def report(
    output: Annotated[str, typer.Option("--output", "-o", help="Directory to write report.md, report.html and "
                                                               "figures/ into.")],
    device: Annotated[list[str] | None, typer.Option("--device", help="Profile name or .json; repeat for several "
                                                     "(default: every profile `tleg-deploy devices` lists).")] = None,
    learngene: Annotated[str | None, typer.Option(
        help="Learngene .safetensors, or 'demo' (default: the one the first --fit was made from, else demo).")]
    = None,
    fit: Annotated[list[Path] | None, typer.Option("--fit", help="A directory written by `tleg-deploy fit`; repeat "
                                                   "for several. Shown in a 'Your fits' section.")] = None,
    family: Annotated[Path | None, typer.Option(help="An export-family directory (its manifest.json gives the "
                                                     "storage figures).")] = None,
    results: Annotated[Path | None, typer.Option(help="Benchmark results directory, made for this learngene "
                                                      "(default: benchmarks/results if it exists and matches).")]
    = None,
    latency: Annotated[str | None, typer.Option(help="Latency budget drawn on accuracy vs latency, e.g. 5ms "
                                                     "(default: one per device, mid-range).")] = None,
    max_depth: Annotated[int, typer.Option(min=1, max=4096, help="Deepest depth plotted and searched.")] = 24,
    force: ForceOpt = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write report.md and a self-contained report.html (plots inlined): latency vs depth per device, the
    deepest depth per latency budget, predicted vs measured latency, accuracy vs depth and vs latency, storage.
    Sections whose benchmark has not run say which command produces them (`make bench` runs them all).

    Example: tleg-deploy report --device host --device jetson -o out/report
    Your fits: tleg-deploy report --fit fit-host --fit fit-jetson --device host --device jetson -o out/report
    """
    from tleg_deploy.errors import TlegError
    from tleg_deploy.model.resources import learngene_path
    from tleg_deploy.plan.units import parse_latency_ms
    from tleg_deploy.report import ReportConfig, build_report
    from tleg_deploy.report.build import check_report_dir
    from tleg_deploy.report.fits import load_fit, results_learngene
    from tleg_deploy.report.inputs import load_results

    if results is not None and not results.is_dir():  # named on purpose: a typo must not give an empty report
        why = "is not a directory" if results.exists() else "does not exist"
        raise TlegError(f"results directory {str(results)!r} {why}",
                        hint=f"leave --results out for {DEFAULT_RESULTS}, or run `make bench` to produce it")
    fits = [load_fit(d) for d in fit or ()]
    if learngene is None:
        made_from = fits[0].learngene_file if fits else None
        if made_from and made_from != "demo" and not Path(made_from).is_file():  # never another learngene, silently
            raise TlegError(f"the first --fit was made from learngene {made_from}, which is no longer there",
                            hint="pass --learngene with that learngene's file")
        learngene = made_from or "demo"
    if results is None and DEFAULT_RESULTS.is_dir():  # the default only for the learngene it was made for
        from tleg_deploy.model.resources import load_learngene

        made_for = results_learngene(load_results(DEFAULT_RESULTS))
        results = DEFAULT_RESULTS if made_for is None or made_for == load_learngene(learngene).sha256() else None
    elif results is None and learngene == "demo":  # sections say how to make the demo's results
        results = DEFAULT_RESULTS
    inputs = [learngene_path(learngene), family, results, *(fit or ()),
              *(d for d in device or () if d.endswith(".json"))]
    dest = check_report_dir(output, inputs=inputs, force=force)
    cfg = ReportConfig(out_dir=dest, devices=tuple(device or ()), learngene=learngene, family=family,
                       results_dir=results, fits=tuple(fit or ()),
                       latency_ms=parse_latency_ms(latency) if latency else None, max_depth=max_depth,
                       force=force)
    log = None if (quiet or json_) else (lambda msg: err.print(f"[dim]{msg}…[/dim]", highlight=False))
    result = build_report(cfg, progress=log, quiet=quiet or json_)
    if json_:
        emit_json(result.to_dict())
        return
    out.print(f"wrote {result.html} and {result.markdown} ({len(result.figures)} figures)", highlight=False)
    for section, cmd in result.missing.items():
        out.print(f"[yellow]no data[/yellow] for {section}: run {cmd}", highlight=False, soft_wrap=True)
    for w in result.warnings:
        out.print(f"[yellow]note[/yellow]: {w}", highlight=False, soft_wrap=True)
