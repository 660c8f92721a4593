"""Export commands: ``export`` (one depth, or fine-tuned ``--weights``) and ``export-family``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tleg_deploy.cli.app import (
    ForceOpt,
    JsonOpt,
    LearngeneOpt,
    QuietOpt,
    command,
    data_path,
    emit_json,
    err,
    out,
)

FormatOpt = Annotated[str, typer.Option("--format", "-f", help="Comma-separated: onnx,int8,fp16,tensorrt.")]
DataOpt = Annotated[str, typer.Option("--data", help="Images for int8/fp16 checks: digits, folder:PATH, npz:PATH.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="Device profile for predicted latency (e.g. jetson).")]
MeasureOpt = Annotated[bool, typer.Option("--measure", help="Measure ONNX Runtime CPU latency of each file here.")]
ExporterOpt = Annotated[str, typer.Option(
    "--exporter", help="ONNX exporter: torchscript, dynamo (torch's default) or auto (TorchScript while torch has it).",
)]
OutDirOpt = Annotated[str, typer.Option("--output", "-o", help="Directory to write (manifest.json at the top); "
                                                               "only its own files are ever replaced.")]


@command("export")
def export_cmd(
    output: OutDirOpt,
    # Not DepthOpt: its typer range check prints a boxed usage error; check_depth below gives one line.
    depth: Annotated[int, typer.Option("--depth", "-d", help="Number of blocks.")],
    learngene: LearngeneOpt = "demo",
    weights: Annotated[Path | None, typer.Option("--weights", help="Fine-tuned descendant .safetensors.")] = None,
    format_: FormatOpt = "onnx",
    data: DataOpt = "digits",
    device: DeviceOpt = None,
    measure: MeasureOpt = False,
    force: ForceOpt = False,
    exporter: ExporterOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export one depth to validated ONNX (and int8 / fp16 / TensorRT build script) in DIR.

    Example: tleg-deploy export --learngene demo --depth 6 --format onnx,int8,fp16,tensorrt -o out/
    """
    from tleg_deploy.errors import SpecError
    from tleg_deploy.export.family import parse_formats
    from tleg_deploy.files.fileio import sha256_file
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.model.spec import check_depth

    check_depth(depth)
    formats = parse_formats(format_)
    dest = _destination(output, learngene, device, data, force, weights)
    lg = load_learngene(learngene)
    models, source, card = None, "expand", None
    if weights is not None:
        from tleg_deploy.model.expansion import descendant_card, load_descendant

        model, meta = load_descendant(weights)
        if model.spec != lg.spec:
            raise SpecError(f"{weights} has spec {model.spec.preset_name() or model.spec.to_dict()}, but the "
                            f"learngene has {lg.spec.preset_name() or lg.spec.to_dict()}",
                            hint="pass the learngene these weights were expanded from")
        if model.depth != depth:
            raise SpecError(f"{weights} has depth {model.depth}, not --depth {depth}",
                            hint=f"use --depth {model.depth}")
        models, source = {depth: model.eval()}, f"weights:{sha256_file(weights)}"
        card = descendant_card(meta) or lg.data  # fine-tuned weights know their own classes
    _export(lg, learngene, [depth], dest, formats, data=data, device=device, measure=measure, json_=json_,
            quiet=quiet, models=models, source=source, force=force, exporter=exporter,
            card=card)


@command("export-family")
def export_family_cmd(
    output: OutDirOpt,
    depths: Annotated[str, typer.Option("--depths", help="Depths: 1-12, 2,4,8 or 1-24:2.")] = "1-12",
    learngene: LearngeneOpt = "demo",
    format_: FormatOpt = "onnx",
    data: DataOpt = "digits",
    device: DeviceOpt = None,
    measure: MeasureOpt = False,
    force: ForceOpt = False,
    exporter: ExporterOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export and validate every depth of a learngene's family; re-runs skip finished members.

    Example: tleg-deploy export-family --learngene demo --depths 1-12 --format onnx,int8 -o family/
    """
    from tleg_deploy.export.family import parse_depths, parse_formats
    from tleg_deploy.model.resources import load_learngene

    wanted = parse_depths(depths)
    formats = parse_formats(format_)
    dest = _destination(output, learngene, device, data, force)
    _export(load_learngene(learngene), learngene, wanted, dest, formats, data=data, device=device,
            measure=measure, json_=json_, quiet=quiet, force=force, exporter=exporter)


def _destination(output: str, learngene: str, device: str | None, data: str, force: bool,
                 weights: Path | None = None) -> Path:
    """The output directory, checked before any work (``files.outputs``); the inputs must be files."""
    from tleg_deploy.export.family import check_export_dir
    from tleg_deploy.files.outputs import input_file
    from tleg_deploy.model.resources import learngene_path

    inputs: list[Any] = [input_file(learngene_path(learngene), "learngene"), data_path(data)]
    if weights is not None:
        inputs.append(input_file(weights, "weights"))
    if device is not None and device.endswith(".json"):
        inputs.append(device)
    return check_export_dir(output, inputs=inputs, force=force)


def _export(lg: Any, learngene: str, depths: list[int], output: Path, formats: tuple[str, ...], *, data: str,
            device: str | None, measure: bool, json_: bool, quiet: bool, models: dict[int, Any] | None = None,
            source: str = "expand", force: bool = False, exporter: str = "auto", card: Any = None) -> None:
    """What both commands share: the device profile, ``export_family`` under a progress bar, the render."""
    from tleg_deploy.export.family import export_family
    from tleg_deploy.model.resources import learngene_path

    profile = None
    if device is not None:
        from tleg_deploy.profile.registry import resolve_profile

        profile = resolve_profile(device, spec=lg.spec)
    with _progress(quiet or json_) as progress:
        manifest = export_family(lg, depths, output, formats, data=data, learngene_file=learngene_path(learngene),
                                 models=models, source=source, profile=profile, measure_latency=measure,
                                 progress=progress, force=force, exporter=exporter, card=card)
    _render(manifest, output, json_, depths=depths)


@contextmanager
def _progress(off: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    if off or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("exporting", total=None)

        def update(text: str, done: int, total: int) -> None:
            bar.update(task, description=f"exporting {text}", completed=done, total=total)

        yield update


def _render(manifest: dict[str, Any], output: Path, json_: bool, depths: list[int]) -> None:
    if json_:
        emit_json(manifest)
        return
    table = Table("depth", "precision", "file", "MB", "params", "GMACs", "|Δ| torch", "agree", "p50 ms")
    for a in manifest["artifacts"]:
        if a["depth"] not in depths:
            continue
        parity = a.get("parity") or {}
        lat = a.get("latency") or {}
        measured = (lat.get("measured") or {}).get("p50_ms")
        predicted = (lat.get("predicted") or {}).get("p50_ms")
        latency = f"{measured:.2f}" if measured else f"~{predicted:.2f}" if predicted else "-"
        diff = parity.get("max_abs_diff")
        agree = parity.get("agreement")
        table.add_row(str(a["depth"]), a["precision"] if a["format"] == "onnx" else f"{a['precision']} engine",
                      Path(a["file"]).name, f"{a['bytes'] / 1e6:.2f}", f"{a['params']:,}", f"{a['macs'] / 1e9:.3f}",
                      "-" if diff is None else f"{diff:.1e}", "-" if agree is None else f"{agree:.1%}", latency)
    out.print(table)
    s = manifest["storage"]
    out.print(f"learngene {s['learngene_bytes'] / 1e6:.2f} MB ({s['learngene_params']:,} params) -> "
              f"{s['members']} members: {s['family_fp32_onnx_bytes'] / 1e6:.2f} MB fp32 ONNX "
              f"({s['fp32_bytes_ratio']}x), {s['family_params']:,} params ({s['params_ratio']}x); "
              f"all files {s['family_bytes'] / 1e6:.2f} MB")
    if "tensorrt" in manifest["formats"]:
        out.print("TensorRT: run build_engine.sh in each depth directory on the target device")
    out.print(f"manifest: {output / 'manifest.json'} (p50 ms: measured here, ~predicted from the device profile)")
