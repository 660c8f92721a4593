"""``tleg-deploy fit``: the deepest expansion that fits a budget on a device, built and checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tleg_deploy.cli.app import JsonOpt, LearngeneOpt, QuietOpt, command, data_path, emit_json, err, out

if TYPE_CHECKING:
    from tleg_deploy.deploy.fit_types import FitResult

# Where the paper-claims benchmark writes its accuracy table, relative to the working directory
# (a checkout of this repository); --accuracy names any other file.
DEFAULT_ACCURACY = Path("benchmarks/results/paper_claims.json")


@command()
def fit(
    device: Annotated[str, typer.Option("--device", help="Profile name (host, jetson, ...) or a profile .json.")],
    latency: Annotated[str | None, typer.Option(help="Latency budget, e.g. 5ms, 0.5s, 800us.")] = None,
    memory: Annotated[str | None, typer.Option(help="Peak memory budget, e.g. 256MB, 1.5GiB.")] = None,
    params: Annotated[str | None, typer.Option(help="Parameter budget, e.g. 20M.")] = None,
    percentile: Annotated[str, typer.Option(help="Latency percentile the budget applies to: p50 or p90.")] = "p90",
    margin: Annotated[float, typer.Option(help="Extra headroom on predicted figures, e.g. 0.1 = 10%.")] = 0.0,
    learngene: LearngeneOpt = "demo",
    finetune_data: Annotated[str | None, typer.Option(help="Fine-tune on digits, folder:PATH or npz:PATH.")] = None,
    calib_data: Annotated[str | None, typer.Option(
        help="Validate (and calibrate) int8/fp16 on this data (digits, folder:PATH, npz:PATH) without fine-tuning; "
             "default: --finetune-data, else the learngene's training data if still there, else digits.")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Fine-tuning epochs (with --finetune-data).")] = 5,
    max_depth: Annotated[int | None, typer.Option(min=1, max=4096, help="Deepest depth searched (default: twice "
                                                  "the learngene's Aux-Net depth, or the deepest depth of the "
                                                  "accuracy table).", show_default=False)] = None,
    precision: Annotated[str | None, typer.Option(help="Only these precisions, e.g. fp16,int8 (default: all "
                                                       "the profile has).")] = None,
    objective: Annotated[str, typer.Option(help="deepest, or accuracy (needs an accuracy-by-depth table).")]
    = "deepest",
    accuracy: Annotated[Path | None, typer.Option(help="Accuracy-by-depth JSON for --objective accuracy "
                                                       "(default: benchmarks/results/paper_claims.json).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Directory to write (default fit-DEVICE); "
                                               "a re-run replaces an earlier fit output there.")] = None,
    refresh_profile: Annotated[bool, typer.Option(help="Re-measure the host profile first.")] = False,
    kit_results: Annotated[Path | None, typer.Option(
        help="A device kit (tleg-deploy kit) whose run.sh has run on DEVICE: solve on its measured profile "
             "and step on the depths it measured.", show_default=False)] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pick the deepest expansion that fits the budget on DEVICE, build, export, validate and (on this host)
    measure it; write weights, ONNX, plan, manifest, build_engine.sh and REPORT.md to a directory.

    Example: tleg-deploy fit --latency 5ms --memory 256MB --device jetson -o fit-jetson
    """
    from tleg_deploy.deploy.fit import check_destination
    from tleg_deploy.deploy.fit import fit as run_fit
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.files.outputs import input_file
    from tleg_deploy.model.resources import learngene_path
    from tleg_deploy.plan.solve import Budget, load_accuracy_table

    budget = Budget.from_strings(latency=latency, memory=memory, params=params, percentile=percentile)
    table = load_accuracy_table(accuracy or DEFAULT_ACCURACY) if objective == "accuracy" or accuracy else None
    wanted = tuple(p.strip() for p in precision.split(",") if p.strip()) if precision else None
    search = SearchOptions(margin=margin, max_depth=max_depth, precisions=wanted, objective=objective, accuracy=table)
    inputs = [input_file(learngene_path(learngene), "learngene"), accuracy, data_path(finetune_data),
              data_path(calib_data), device if device.endswith(".json") else None, kit_results]
    dest = check_destination(output if output is not None else f"fit-{Path(device).stem}", inputs)
    request = FitRequest(budget, device=device, out_dir=dest, learngene=learngene, search=search,
                         finetune_data=finetune_data, calib_data=calib_data, epochs=epochs,
                         refresh_profile=refresh_profile, kit_results=kit_results)
    with progress(quiet or json_) as log:
        result = run_fit(request, quiet=quiet or json_, log=log)
    if json_:
        emit_json(result.to_dict())
    else:
        render_summary(result)


@contextmanager
def progress(off: bool) -> Iterator[Callable[[str], None] | None]:
    """Each step as a dim line on stderr; on a terminal also a spinner naming the step under way."""
    if off:
        yield None
        return

    def line(msg: str) -> None:
        err.print(f"[dim]{msg}[/dim]", highlight=False)

    if not err.is_terminal:
        yield line
        return
    with err.status("fit: solving ...") as status:
        def both(msg: str) -> None:
            line(msg)
            status.update(f"fit: {msg}")

        yield both


def render_summary(result: FitResult) -> None:
    """One screen: the pick, why deeper does not fit, measured or estimated, where it went, what next."""
    from rich.table import Table

    plan = result.plan
    p = result.pick
    pct = plan.budget.percentile
    out.print(f"[bold]{plan.device}[/bold] ({plan.source} profile), {plan.spec.preset_name() or 'custom spec'}; "
              f"budget {plan.budget.describe()}" + (f", margin {plan.margin:.0%}" if plan.margin else ""))
    out.print(f"[bold green]pick: depth {result.depth}, {result.precision}[/bold green]  predicted {pct} "
              f"{p.latency_ms:.3g} ms (95% upper {p.latency_upper_ms:.3g}), memory {p.memory_mb:.1f} MB, "
              f"{p.params / 1e6:.2f}M params")
    if result.finetune:
        ft = result.finetune
        out.print(f"fine-tuned {ft.get('epochs')} epoch(s): val top-1 {ft.get('val_acc', float('nan')):.1%}, "
                  f"test top-1 {ft.get('test_acc', float('nan')):.1%}")
    for why in result.rejected.values():
        out.print(f"[yellow]precision {why}[/yellow]; picked again without it", highlight=False)
    for step in result.steps:
        out.print(f"[yellow]measured step:[/yellow] {step}", highlight=False)
    out.print(f"why not deeper{' (solver)' if result.steps else ''}: {plan.why_not_deeper}", highlight=False)
    if result.measured is not None:
        m = result.measured
        where = "on the device (kit results)" if result.kit_results else "here"
        out.print(f"figures: [bold]measured[/bold] {where}, {pct} {m.at(pct):.3g} ms over {m.runs} runs "
                  f"({m.threads} thread{'s' if m.threads > 1 else ''})")
    else:
        out.print(f"figures: [bold yellow]{result.figures}[/bold yellow] ({plan.device} was not run here); "
                  f"measure the device: [cyan]{result.measure_command}[/cyan]", highlight=False)
    for note in result.notes:
        if "estimated profile" not in note and "cannot be run here" not in note:
            out.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    table = Table("depth", "precision", f"{pct} ms", "upper ms", "memory MB", "fits", box=None, padding=(0, 1))
    for c in plan.candidates:
        if min(result.depth, plan.depth) - 2 <= c.depth <= max(result.depth, plan.depth) + 2:
            key = (c.depth, c.precision)
            over = c.precision == result.precision and c.depth in result.over_budget
            mark = "[bold]pick[/bold]" if key == (result.depth, result.precision) else (
                "no (measured over)" if over else ("yes" if c.fits else "no"))
            table.add_row(str(c.depth), c.precision, f"{c.latency_ms:.3g}", f"{c.latency_upper_ms:.3g}",
                          f"{c.memory_upper_mb:.1f}", mark)
    out.print(table)
    out.print(f"wrote {result.out_dir}/: {', '.join(f for f in result.files if not f.endswith('.validation.json'))}",
              highlight=False)
    out.print(f"next: see {result.out_dir}/REPORT.md; on the device run [cyan]bash {result.out_dir}/build_engine.sh"
              "[/cyan]", highlight=False)
