"""Profile commands: ``profile`` (measure this machine, fit the depth cost model, write a profile)
and ``devices`` (the profiles ``--device`` can name)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tleg_deploy.cli.app import ForceOpt, JsonOpt, QuietOpt, SpecOpt, command, emit_json, err, out

if TYPE_CHECKING:
    from tleg_deploy.profile.table import DeviceProfile


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


@command()
def profile(
    device: Annotated[str, typer.Option("--device", help="Name of the profile to write; 'host' = this machine.")]
    = "host",
    backend: Annotated[str, typer.Option(help="onnxruntime, torch or tensorrt.")] = "onnxruntime",
    precision: Annotated[str | None, typer.Option(help="Comma list: fp32, fp16, int8 (default: fp32; "
                                                       "fp16,int8 for tensorrt).")] = None,
    depths: Annotated[str, typer.Option(help="Depths to measure: 1,6,12 or 1-12 (at least two).")] = "1,6,12",
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    threads: Annotated[int, typer.Option(help="Intra-op threads (recorded in the profile).")] = 1,
    spec: SpecOpt = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="Measure on CUDA (torch/onnxruntime); tensorrt always is.")]
    = False,
    rounds: Annotated[int | None, typer.Option(help="Interleaved timing rounds (default 5; --ssh with tensorrt: "
                                                    "3 trtexec runs per engine).")] = None,
    repeats: Annotated[int, typer.Option(help="--ssh: make the whole measurement this many times, each a fresh "
                                              "session on the target, and pool them.")] = 1,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="Skip the peak-memory subprocesses.")] = False,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Profile .json to write (default for a "
                                               "device other than host: profiles/DEVICE.json); an existing "
                                               "profile there gets the new entries.")] = None,
    refresh: Annotated[bool, typer.Option(help="Re-measure host even if a cached profile exists.")] = False,
    force: ForceOpt = False,
    from_kit: Annotated[Path | None, typer.Option("--from-kit", help="Import a device kit's results (see `kit`).")]
    = None,
    ssh: Annotated[str | None, typer.Option(help="Measure user@host[:port] over SSH with a device kit.")] = None,
    ssh_config: Annotated[Path | None, typer.Option(help="ssh -F file (default: ~/.ssh/config).")] = None,
    remote_python: Annotated[str | None, typer.Option(help="python3 on the target (onnxruntime kits).")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure this machine at a few depths, fit latency and memory as intercept + slope x depth, and write
    the profile (host: also cached for --device host elsewhere). --spec defaults to digits; several presets
    or files measure several specs (--spec deit-tiny,deit-small).

    Example: tleg-deploy profile --device host --backend onnxruntime --depths 1,6,12 -o profiles/laptop.json
    """
    from tleg_deploy.errors import TlegError
    from tleg_deploy.files.outputs import check_plain_name

    check_plain_name(device)  # it names profiles/DEVICE.json: no '/', no '..'
    if repeats != 1 and ssh is None:
        raise TlegError("--repeats is for --ssh (a kit's measurement made again on the target)",
                        hint="here, more --rounds; a kit made with `kit --repeats N` is pooled by --from-kit")
    dest = _destination(output, force) if output is not None else None
    if from_kit is not None or ssh is not None:
        from tleg_deploy.cli.kit import kit_profile

        imported, written = kit_profile(device=device, backend=backend, precision=precision, depths=depths,
                                        batch=batch, threads=threads, spec=spec, from_kit=from_kit, ssh=ssh,
                                        ssh_config=ssh_config, remote_python=remote_python, rounds=rounds,
                                        repeats=repeats, memory=not no_memory, output=dest, quiet=quiet or json_)
        _show(imported, imported.specs(), written, json_)
        return
    from tleg_deploy.export.family import parse_depths
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.model.spec_text import parse_specs
    from tleg_deploy.profile.measure import MeasureConfig

    archs = parse_specs(spec) if spec is not None else [ViTSpec.preset("digits")]
    cfg = MeasureConfig(backend=backend, precisions=precisions_for(precision, backend),
                        depths=tuple(parse_depths(depths)), batch=batch, threads=threads,
                        device="cuda" if (gpu or backend == "tensorrt") else "cpu",
                        rounds=5 if rounds is None else rounds, memory=not no_memory)
    if _host_default(device, dest, precision, cfg):
        result, saved = _cached_host(archs, refresh, quiet or json_), None
    else:
        result, saved = _measured(device, cfg, archs, dest, force, quiet or json_)
    _show(result, archs, saved, json_)


def precisions_for(precision: str | None, backend: str) -> tuple[str, ...]:
    """``--precision`` as a tuple; by default fp32 (fp16 and int8 for tensorrt)."""
    return _csv(precision) if precision else (("fp16", "int8") if backend == "tensorrt" else ("fp32",))


def _host_default(device: str, dest: Path | None, precision: str | None, cfg: Any) -> bool:
    """Whether ``profile`` was asked for nothing but this machine's default profile, the cached one (an explicit
    ``--precision`` or ``-o`` measures afresh)."""
    from tleg_deploy.profile import registry
    from tleg_deploy.profile.measure import MeasureConfig

    return (device == registry.HOST and dest is None and precision is None
            and cfg == MeasureConfig(depths=registry.HOST_DEPTHS))


def _cached_host(archs: Sequence[Any], refresh: bool, quiet: bool) -> DeviceProfile:
    """This machine's default profile for ``archs`` (measured on first use or with ``refresh``); a cached one is
    probed for drift: how fast is this host now against it?"""
    from tleg_deploy.profile import registry
    from tleg_deploy.profile.drift import probe_and_apply

    for arch in archs:
        result = registry.host_profile(arch, refresh=refresh, quiet=quiet)
    if refresh:
        return result
    result = probe_and_apply(result)
    registry.remember_probe(result)
    return result


def _measured(device: str, cfg: Any, archs: Sequence[Any], dest: Path | None, force: bool,
              quiet: bool) -> tuple[DeviceProfile, Path | None]:
    """``archs`` measured here now with ``cfg`` as ``device``, written to ``dest`` (a device other than host:
    ``profiles/DEVICE.json`` by default) and added to a profile measured there earlier unless ``force``; the
    profile and the file written (None: host without ``-o``, printed only)."""
    from tleg_deploy.errors import TlegError
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile import registry
    from tleg_deploy.profile.measure import profile as measure
    from tleg_deploy.profile.table import DeviceProfile

    aliases: tuple[str, ...] = ()
    if device != registry.HOST:
        try:  # a known device keeps its canonical name and aliases (jetson -> jetson-orin-nano)
            known = registry.resolve_profile(device)
            device, aliases = known.name, known.aliases
        except TlegError:
            pass
        dest = dest or _destination(str(Path("profiles") / f"{device}.json"), force)
    result = DeviceProfile.load(dest) if dest is not None and dest.is_file() and not force else None  # add to it
    for arch in archs:
        lg = load_learngene("demo") if arch == ViTSpec.preset("digits") else None
        result = measure(arch, name=device, config=cfg, learngene=lg, aliases=aliases, quiet=quiet, base=result)
    if result is None:  # unreachable: archs is never empty
        raise TlegError("no spec to measure", hint="pass --spec digits")
    if dest is not None:
        result.save(dest)
    return result, dest


def _show(result: DeviceProfile, archs: Sequence[Any], written: Path | None, json_: bool) -> None:
    """The profile as a table per spec (or JSON), and the file written."""
    if json_:
        emit_json({**result.to_dict(), "written": str(written) if written else None,
                   "drift": result.drift.to_dict() if result.drift is not None else None})
        return
    for arch in archs:
        render_profile(result, arch)
    if written is not None:
        out.print(f"wrote {written}")


def _destination(output: str, force: bool) -> Path:
    """The profile file to write: an existing one must be a profile (it gets the new entries), unless
    ``--force`` replaces it; never a directory, a device file or a fifo."""
    from tleg_deploy.errors import OutputError, TlegError
    from tleg_deploy.files.outputs import output_file
    from tleg_deploy.profile.table import DeviceProfile

    dest = output_file(output, force=True)  # the path checks; whether an existing file may change is below
    if dest.is_file() and not force:
        try:
            DeviceProfile.load(dest)
        except (TlegError, OSError, ValueError):
            raise OutputError(f"{dest} exists and is not a device profile (so it cannot get the new entries)",
                              hint="pass --force to replace it, or choose another -o") from None
    return dest


def render_profile(prof: DeviceProfile, arch: Any) -> None:
    from rich.table import Table

    for entry in prof.entries:
        if entry.spec != arch:
            continue
        table = Table("depth", "p50 ms", "p90 ms", "p99 ms", "runs", "peak MB",
                      title=f"{prof.name}: {prof.backend} {entry.precision}, batch {entry.batch}, "
                            f"{arch.preset_name() or 'custom spec'} ({prof.source})")
        for p in entry.points:
            table.add_row(str(p.depth), f"{p.p50_ms:.4g}", f"{p.p90_ms:.4g}", f"{p.p99_ms:.4g}", str(p.n),
                          f"{p.memory_mb:.1f}")
        out.print(table)
        fits = (("latency p50", entry.fit.latency_p50, "ms"), ("latency p90", entry.fit.latency_p90, "ms"),
                ("peak memory", entry.fit.memory, "MB"))
        for label, f, unit in fits:
            out.print(f"  {label}: {f.intercept:.4g} + {f.slope:.4g}·depth {unit}  (R² {f.r2:.4f}, worst residual "
                      f"{f.worst_residual_rel:.1%}, leave-one-out {f.loo_error_rel:.1%})", highlight=False)
        if entry.fit.latency_p50.worst_residual_rel > 0.03:
            err.print(f"[yellow]warning[/yellow]: {entry.precision} p50 points are off a line by "
                      f"{entry.fit.latency_p50.worst_residual_rel:.0%} (a busy machine?): the prediction intervals "
                      "are wide; re-measure on a quiet machine", highlight=False)
    if prof.notes:
        err.print(f"[yellow]note[/yellow]: {prof.notes}", highlight=False)
    if prof.probe is not None:
        info = prof.probe
        uses = f"; ±{info.use_variation_rel:.1%} between its {len(info.uses)} use(s) since" if info.uses else ""
        out.print(f"  drift probe reference: {info.describe()}, p50 {info.reference_p50_ms:.4g} ms; machine variation "
                  f"±{info.variation_rel:.1%} in every latency interval ({len(info.history)} probes while profiling"
                  f"{uses})", highlight=False)
    if prof.drift is not None:
        out.print(prof.drift.message, highlight=False)


@command()
def devices(
    name: Annotated[str | None, typer.Argument(help="Show one profile (name, alias or .json path) in detail.")] = None,
    json_: JsonOpt = False,
) -> None:
    """List the device profiles --device can name: shipped estimates, your ./profiles and $TLEG_DEPLOY_PROFILES,
    and the cached host measurement; with NAME, show that profile's fits and sources.

    Example: tleg-deploy devices jetson
    """
    from rich.table import Table

    from tleg_deploy.profile import registry

    if name is not None:
        show_device(registry.resolve_profile(name), json_)
        return
    scan = registry.scan_profiles()
    rows: list[dict[str, Any]] = []
    for p in scan.profiles:
        specs = sorted({e.spec.preset_name() or "custom" for e in p.entries})
        rows.append({"name": p.name, "aliases": list(p.aliases), "source": p.source, "kind": p.kind,
                     "backends": [p.backend], "precisions": sorted({e.precision for e in p.entries}),
                     "specs": specs, "date": p.date, "measure_command": p.measure_command})
    if not any(r["name"] == registry.HOST for r in rows):
        rows.insert(0, {"name": registry.HOST, "aliases": [], "source": "measured on first use", "kind": "cpu",
                        "backends": ["onnxruntime"], "precisions": list(registry.host_precisions()), "specs": [],
                        "date": "", "measure_command": "tleg-deploy profile --device host"})
    if json_:
        emit_json({"devices": rows, "problems": scan.problems})
        return
    table = Table("aliases", "source", "backend", "precisions", "specs", "date")
    table.add_column("name", no_wrap=True)
    table.columns.insert(0, table.columns.pop())
    for r in rows:
        # ", " lets rich wrap long lists in a narrow terminal instead of cutting them to "fp16,i…"
        table.add_row(r["name"], ", ".join(r["aliases"]), r["source"], ", ".join(r["backends"]),
                      ", ".join(r["precisions"]), ", ".join(r["specs"]), r["date"][:10])
    out.print(table)
    for problem in scan.problems:
        err.print(f"[yellow]skipped[/yellow] {problem}", highlight=False)


def show_device(prof: DeviceProfile, json_: bool) -> None:
    from rich.table import Table

    from tleg_deploy.profile.registry import estimate_notice

    if json_:
        emit_json(prof.to_dict())
        return
    aliases = f" (aliases: {', '.join(prof.aliases)})" if prof.aliases else ""
    out.print(f"[bold]{prof.name}[/bold]{aliases}: {prof.source} {prof.kind} profile, backend {prof.backend}, "
              f"{prof.date or 'undated'}", highlight=False)
    for key, fact in prof.hardware.items():
        value = f"{fact['value']:.4g}" if isinstance(fact["value"], float) else fact["value"]
        out.print(f"  {key}: {value} {fact.get('unit', '')}  [dim]— {fact['source']}[/dim]", highlight=False)
    table = Table("spec", "precision", "batch", "p50 ms = a + b·depth", "p90 ms = a + b·depth", "MB = a + b·depth",
                  "depths")
    for e in prof.entries:
        f = e.fit
        table.add_row(e.spec.preset_name() or "custom", e.precision, str(e.batch),
                      f"{f.latency_p50.intercept:.4g} + {f.latency_p50.slope:.4g}",
                      f"{f.latency_p90.intercept:.4g} + {f.latency_p90.slope:.4g}",
                      f"{f.memory.intercept:.4g} + {f.memory.slope:.4g}", f"{min(e.depths)}-{max(e.depths)}")
    out.print(table)
    notice = estimate_notice(prof)
    if notice:
        err.print(f"[yellow]note[/yellow]: {notice}", highlight=False)
