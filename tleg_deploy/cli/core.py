"""Model-core commands: ``expand``, ``extract``, ``import-tleg``, ``info``, ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tleg_deploy.cli.app import (
    DepthOpt,
    ForceOpt,
    JsonOpt,
    LearngeneOpt,
    QuietOpt,
    SpecOpt,
    command,
    emit_json,
    out,
)
from tleg_deploy.files.outputs import input_file, output_file


@command()
def expand(
    output: Annotated[str, typer.Option("--output", "-o", help="Descendant .safetensors to write.")],
    depth: DepthOpt,
    learngene: LearngeneOpt = "demo",
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Expand a learngene into a plain ViT of DEPTH blocks (timm key names).

    Example: tleg-deploy expand --learngene demo --depth 6 -o digits6.safetensors
    """
    from tleg_deploy.model.expansion import expand as expand_lg
    from tleg_deploy.model.expansion import save_descendant
    from tleg_deploy.model.resources import learngene_path, load_learngene

    dest = output_file(output, inputs=[input_file(learngene_path(learngene), "learngene")], force=force)
    lg = load_learngene(learngene)
    model = expand_lg(lg, depth)
    save_descendant(model, dest, lg.sha256(), {"made_by": "expand", "learngene": str(learngene)}, data=lg.data)
    result = {"output": str(output), "depth": depth, "params": sum(p.numel() for p in model.parameters())}
    if json_:
        emit_json(result)
    else:
        out.print(f"wrote {output}: depth {depth}, {result['params']:,} parameters")


@command()
def extract(
    model: Annotated[Path, typer.Argument(help="Trained plain ViT (.safetensors, timm key names).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Learngene .safetensors to write.")],
    spec: SpecOpt,
    aux_depth: Annotated[int | None, typer.Option(min=1, help="Aux depth to record (default: the model's).")] = None,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Fit a learngene (least squares, coefficients i/L) to a trained ViT and report R² per tensor.

    Example: tleg-deploy extract my_vit12.safetensors --spec deit-tiny -o my_learngene.safetensors
    """
    dest = output_file(output, inputs=[input_file(model, "model")], force=force)  # refused before torch loads
    from tleg_deploy.model.extract import extract_learngene
    from tleg_deploy.model.spec_text import parse_spec

    lg, report = extract_learngene(model, parse_spec(str(spec)), aux_depth)
    lg.save(dest)
    if json_:
        emit_json({"output": str(output), **report.to_dict()})
        return
    table = Table("block tensor", "R² (linear in depth)")
    for name, r2 in report.r2.items():
        table.add_row(name, f"{r2:.3f}")
    for name in report.constant:
        table.add_row(name, "n/a (constant across layers)")
    out.print(table)
    out.print(f"wrote {output}: {report.summary()}")


@command("import-tleg")
def import_tleg(
    checkpoint: Annotated[Path, typer.Argument(help="Official TLEG Aux-Net checkpoint (.pth).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Learngene .safetensors to write.")],
    aux_depth: Annotated[int, typer.Option(min=1, max=4096, help="Aux-Net depth it was trained at.")] = 12,
    num_heads: Annotated[int | None, typer.Option(min=1, help="Heads (default embed_dim // 64).")] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Take the EMA weights.")] = False,
    force: ForceOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Convert an official TLEG (AlphaXia/TLEG) Aux-Net checkpoint into our learngene format.

    Example: tleg-deploy import-tleg aux_deit_small/checkpoint.pth -o aux_small.safetensors
    """
    dest = output_file(output, inputs=[input_file(checkpoint, "checkpoint")], force=force)  # before torch loads
    from tleg_deploy.model.tleg_import import import_tleg_checkpoint

    lg = import_tleg_checkpoint(checkpoint, aux_depth=aux_depth, num_heads=num_heads, use_ema=ema)
    lg.save(dest)
    info = {"output": str(output), "spec": lg.spec.preset_name() or lg.spec.to_dict(), "params": lg.num_params()}
    if json_:
        emit_json(info)
    else:
        out.print(f"wrote {output}: {info['spec']}, {info['params']:,} parameters")


@command()
def info(
    path: Annotated[str, typer.Argument(help="A learngene or descendant file, or 'demo'.")] = "demo",
    json_: JsonOpt = False,
) -> None:
    """Describe a learngene (spec, aux depth, params per depth, bytes, provenance) or a descendant.

    Example: tleg-deploy info demo
    """
    from tleg_deploy.deploy.inspect import describe_file

    if path != "demo":
        input_file(path)
    facts = describe_file(path)
    if json_:
        emit_json(facts)
    else:
        _render_info(facts)


@command()
def demo(
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for the two fit outputs.")] = "tleg-demo",
    jetson_latency: Annotated[str, typer.Option(help="The Jetson latency budget (the headline `fit --latency 5ms "
                                                     "--device jetson`).")] = "5ms",
    quiet: QuietOpt = False,
) -> None:
    """The main job on bundled defaults (run by `make demo`): `fit` the demo learngene to this host
    (measured here) and to a Jetson Orin Nano (estimated profile), each with a budget that gives a
    non-trivial depth. The host budget is what depth 6 costs on this machine (its p90 upper bound),
    so the demo means the same on a fast or a slow CPU.

    Example: tleg-deploy demo -o tleg-demo
    """
    from tleg_deploy.cli.fit import progress, render_summary
    from tleg_deploy.deploy.fit import check_destination, fit
    from tleg_deploy.deploy.fit_types import FitRequest
    from tleg_deploy.files.outputs import output_dir
    from tleg_deploy.model.resources import learngene_spec
    from tleg_deploy.plan.solve import Budget, evaluate
    from tleg_deploy.profile.registry import resolve_profile

    # Everything the two halves need is checked before the first starts: a bad --jetson-latency or -o
    # must not fail only after the host half was written.
    jetson_budget = Budget.from_strings(latency=jetson_latency, memory="256MB")
    root = output_dir(output, ours=lambda _d: True)  # it only holds the two halves, each checked below
    for half in ("host", "jetson"):
        check_destination(root / half)
    spec = learngene_spec("demo")
    out.rule("[bold]1/2 host[/bold]: this machine, ONNX Runtime CPU, 1 thread (measured on first use, then cached)")
    host = resolve_profile("host", spec=spec, quiet=quiet)
    probe = Budget(latency_ms=1e9)
    depth6 = min((evaluate(host, probe, spec=spec, depth=6, precision=p) for p in host.precisions(spec)),
                 key=lambda c: c.latency_upper_ms)
    budget = Budget(latency_ms=round(depth6.latency_upper_ms * 1.02, 4))
    with progress(quiet) as log:
        result = fit(FitRequest(budget, device=host, out_dir=root / "host"), quiet=quiet, log=log)
    render_summary(result)
    out.rule("[bold]2/2 jetson[/bold]: Jetson Orin Nano, TensorRT (estimated profile: nothing is run)")
    with progress(quiet) as log:
        result = fit(FitRequest(jetson_budget, device="jetson", out_dir=root / "jetson"), quiet=quiet, log=log)
    render_summary(result)


def _render_info(facts: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key, value in facts.items():
        if key == "params_by_depth":
            value = ", ".join(f"L={d}: {n:,}" for d, n in value.items())
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, int):
            value = f"{value:,}"
        table.add_row(f"[bold]{key}[/bold]", str(value))
    out.print(table)
