"""``tleg-deploy fit``: the deepest expansion that fits a budget on a device, built and checked."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tleg_deploy.cli.app import JsonOpt, LearngeneOpt, QuietOpt, command, data_path, emit_json, err, out

if TYPE_CHECKING:
    from tleg_deploy.deploy.fit_types import FitRequest, FitResult

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
    refresh_profile: Annotated[bool, typer.Option(help="Re-measure the host profile first (with --ssh: the "
                                                       "device's, over SSH).")] = False,
    kit_results: Annotated[Path | None, typer.Option(
        help="A device kit (fit --kit, or tleg-deploy kit) whose run.sh has run on DEVICE: solve on its measured "
             "profile and step on the depths it measured.", show_default=False)] = None,
    kit: Annotated[Path | None, typer.Option(
        "--kit", help="For a device this machine cannot reach: solve, then write a kit (DIR and DIR.tar.gz) that "
                      "measures the pick and 3 depths either side on DEVICE, and stop; run it there, then fit "
                      "again with --kit-results DIR.", show_default=False)] = None,
    kit_repeats: Annotated[int | None, typer.Option(
        min=1, max=20, help="With --kit: measure its depths this many times over (default 4: a reading near the "
                            "budget is decided on the 3 later ones; 9 lets it be timed afresh up to 8 times, as "
                            "fit does here and over SSH).", show_default=False)] = None,
    ssh: Annotated[str | None, typer.Option(
        help="Measure on DEVICE at user@host[:port] over SSH: device kits time the pick and each step there, "
             "and run again to time a depth read near the budget afresh (a DEVICE without a profile is profiled "
             "there first).", show_default=False)] = None,
    ssh_config: Annotated[Path | None, typer.Option(help="ssh -F file (default: ~/.ssh/config).",
                                                    show_default=False)] = None,
    remote_python: Annotated[str | None, typer.Option(help="The target's python with onnxruntime and numpy "
                                                           "(default python3).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="With --kit: replace an existing kit at DIR.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pick the deepest expansion that fits the budget on DEVICE, build, export, validate and (on this host)
    measure it; write weights, ONNX, plan, manifest, build_engine.sh and REPORT.md to a directory.

    Examples:
      tleg-deploy fit --latency 5ms --memory 256MB --device jetson -o fit-jetson
      tleg-deploy fit --latency 20ms --device pi --ssh me@pi.local    (measured on the device)
      tleg-deploy fit --latency 5ms --device orin --kit kit-orin      (run kit-orin/run.sh there, then:)
      tleg-deploy fit --latency 5ms --device orin --kit-results kit-orin
    """
    from tleg_deploy.deploy.fit import check_destination
    from tleg_deploy.deploy.fit import fit as run_fit
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.files.outputs import input_file
    from tleg_deploy.model.resources import learngene_path
    from tleg_deploy.plan.solve import Budget, load_accuracy_table
    from tleg_deploy.profile.remote import SshRun, SshTarget

    if kit_repeats is not None and kit is None:
        from tleg_deploy.errors import TlegError

        raise TlegError("--kit-repeats shapes the kit that --kit writes", hint="add --kit DIR, or drop --kit-repeats")
    run = None if ssh is None else SshRun(SshTarget.parse(ssh), ssh_config, remote_python)
    budget = Budget.from_strings(latency=latency, memory=memory, params=params, percentile=percentile)
    table = load_accuracy_table(accuracy or DEFAULT_ACCURACY) if objective == "accuracy" or accuracy else None
    wanted = tuple(p.strip() for p in precision.split(",") if p.strip()) if precision else None
    search = SearchOptions(margin=margin, max_depth=max_depth, precisions=wanted, objective=objective, accuracy=table)
    inputs = [input_file(learngene_path(learngene), "learngene"), accuracy, data_path(finetune_data),
              data_path(calib_data), device if device.endswith(".json") else None, kit_results]
    target = output if output is not None else f"fit-{Path(device).stem}"
    # --kit writes the kit only (build_kit checks its own destination); a fit writes -o
    dest = check_destination(target, inputs) if kit is None else Path(target or ".")
    request = FitRequest(budget, device=device, out_dir=dest, learngene=learngene, search=search,
                         finetune_data=finetune_data, calib_data=calib_data, epochs=epochs,
                         refresh_profile=refresh_profile, kit_results=kit_results, ssh=run)
    if kit is not None:
        flags = {"--latency": latency, "--memory": memory, "--params": params,
                 "--percentile": None if percentile == "p90" else percentile, "--margin": margin or None,
                 "--max-depth": max_depth, "--precision": precision, "--learngene": learngene}
        again = " ".join(f"{k} {v}" for k, v in flags.items() if v is not None)
        _write_kit(request, kit, again, repeats=kit_repeats, force=force, json_=json_, quiet=quiet)
        return
    with progress(quiet or json_) as log:
        result = run_fit(request, quiet=quiet or json_, log=log)
    if json_:
        emit_json(result.to_dict())
    else:
        render_summary(result)


def _write_kit(request: FitRequest, kit: Path, again: str, *, repeats: int | None, force: bool, json_: bool,
               quiet: bool) -> None:
    from tleg_deploy.deploy.fit import fit_kit

    with progress(quiet or json_) as log:
        plan, written = fit_kit(request, kit, repeats=repeats, force=force, log=log)
    tarball = written.with_name(written.name + ".tar.gz")
    if json_:
        emit_json({"kit": str(written), "tarball": str(tarball), "device": plan.device, "depth": plan.depth,
                   "precision": plan.precision, "plan": plan.to_dict()})
        return
    device = request.device if isinstance(request.device, str) else plan.device
    depths, repeats = _kit_depths(written)
    over = f", {repeats} times over (a reading near the budget is decided on the later ones)" if repeats > 1 else ""
    out.print(f"solved on {plan.device} ({plan.source} profile): depth {plan.depth} {plan.precision}, predicted "
              f"{plan.budget.percentile} {plan.pick.latency_ms:.3g} ms\n"
              f"wrote {written} and {tarball}: it measures depths {', '.join(map(str, depths))} on the device{over}\n"
              f"on the device:  tar xzf {tarball.name} && sh {written.name}/run.sh\n"
              f"then, here, with {written.name}/results copied back:  tleg-deploy fit --device {device} {again} "
              f"--kit-results {written}", highlight=False, soft_wrap=True)


def _kit_depths(kit_dir: Path) -> tuple[list[int], int]:
    """The depths a kit measures and how many times it repeats the measurement."""
    from tleg_deploy.profile.kit import read_kit_json

    kit = read_kit_json(kit_dir)
    return [int(d) for d in kit["depths"]], int(kit["protocol"].get("repeats", 1))


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
        where = ("on the device (kit results)" if result.kit_results else
                 f"on the device at {result.ssh} (over SSH)" if result.ssh else "here")
        out.print(f"figures: [bold]measured[/bold] {where}, {pct} {m.at(pct):.3g} ms over {m.runs} runs "
                  f"({m.threads} thread{'s' if m.threads > 1 else ''})")
    elif result.kit_results:  # the kit measured other depths: the note says how to measure the pick
        out.print(f"figures: [bold yellow]{result.figures}[/bold yellow] from the profile of the kit's run "
                  f"(it did not measure depth {result.depth})", highlight=False)
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
