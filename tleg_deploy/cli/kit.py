"""The ``kit`` command: write a device kit that measures a target with nothing of ours installed
(``tleg_deploy.profile.kit``), and the helpers ``profile --from-kit`` / ``profile --ssh`` share."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tleg_deploy.cli.app import JsonOpt, QuietOpt, SpecOpt, command, emit_json, err, out

if TYPE_CHECKING:
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile.kit import KitConfig
    from tleg_deploy.profile.table import DeviceProfile


def kit_config(device: str, backend: str, precision: str | None, depths: str, batch: int, threads: int,
               rounds: int | None, no_memory: bool, clock: str = "wall", repeats: int = 1) -> KitConfig:
    from tleg_deploy.cli.profile import precisions_for
    from tleg_deploy.export.family import parse_depths
    from tleg_deploy.profile.kit import KitConfig

    return KitConfig.for_backend(device, backend, precisions_for(precision, backend), tuple(parse_depths(depths)),
                                 batch=batch, threads=threads, rounds=rounds, memory=not no_memory, clock=clock,
                                 repeats=repeats)


def spec_and_learngene(spec: str | None, learngene: str | None) -> tuple[ViTSpec, Any]:
    """The architecture to measure: a learngene's (its expansions are exported), else a preset
    (``digits`` uses the bundled demo learngene, like ``profile``), a spec file or ``key=value,...``."""
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.model.spec_text import parse_spec

    if learngene is not None:
        lg = load_learngene(learngene)
        return lg.spec, lg
    arch = parse_spec(spec or "digits")
    return arch, load_learngene("demo") if arch == ViTSpec.preset("digits") else None


def merge_into(result: DeviceProfile, output: Path) -> DeviceProfile:
    """``result`` plus the other entries of a measured profile of the same backend already at ``output``."""
    import dataclasses

    from tleg_deploy.errors import FormatError
    from tleg_deploy.profile.table import DeviceProfile

    if not output.exists():
        return result
    base = DeviceProfile.load(output)  # refuses a file that is not a profile: we never overwrite it
    if base.source != "measured" or base.backend != result.backend:
        raise FormatError(f"{output} holds a {base.source} {base.backend} profile, not a measured {result.backend} one",
                          hint="write the imported profile to another -o")
    return dataclasses.replace(result, entries=base.with_entries(result.entries).entries)


@command()
def kit(
    device: Annotated[str, typer.Option("--device", help="Name of the target (the profile it becomes).")],
    backend: Annotated[str, typer.Option(help="tensorrt (needs only trtexec there) or onnxruntime (needs python3 "
                                              "with onnxruntime and numpy).")] = "onnxruntime",
    precision: Annotated[str | None, typer.Option(help="Comma list: fp32, fp16, int8 (default: fp32; fp16,int8 for "
                                                       "tensorrt).")] = None,
    spec: SpecOpt = None,
    learngene: Annotated[str | None, typer.Option("--learngene", "-l", help="Learngene file or 'demo': measure "
                                                  "its architecture, with its expanded weights.")] = None,
    depths: Annotated[str, typer.Option(help="Depths to measure: 1,6,12 or 1-12 (at least two).")] = "1,6,12",
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    threads: Annotated[int, typer.Option(help="Intra-op threads (onnxruntime).")] = 1,
    rounds: Annotated[int | None, typer.Option(help="Interleaved rounds (default 5; tensorrt: 3 trtexec runs per "
                                                    "engine).")] = None,
    repeats: Annotated[int, typer.Option(help="Make the whole measurement this many times, each a fresh session "
                                              "(the import pools them; fit --kit-results reads them as successive "
                                              "timings; fit --kit makes 4).")] = 1,
    no_memory: Annotated[bool, typer.Option("--no-memory", help="Skip peak memory (onnxruntime).")] = False,
    clock: Annotated[str, typer.Option(help="onnxruntime: 'wall', or 'thread' (CPU time of the timing thread, "
                                            "1 thread: a diagnostic for a machine shared with other jobs).")]
    = "wall",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Kit directory to write (also DIR.tar.gz); "
                                                "default kit-DEVICE.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing kit at -o.")] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a device kit: ONNX files, kit.json and run.sh that measure a target with nothing of tleg-deploy
    installed there. Copy it over, run `sh run.sh`, copy it back and import it with `profile --from-kit`.

    Example: tleg-deploy kit --device orin --backend tensorrt -o kit-orin
    """
    from tleg_deploy.profile.kit import build_kit, check_kit_destination

    if spec is not None and learngene is not None:
        from tleg_deploy.errors import TlegError

        raise TlegError("give --spec or --learngene, not both")
    arch, lg = spec_and_learngene(spec, learngene)
    cfg = kit_config(device, backend, precision, depths, batch, threads, rounds, no_memory, clock, repeats)
    target = output or Path(f"kit-{device}")
    check_kit_destination(target, force=force)  # before the exports, not after
    if not (quiet or json_):
        err.print(f"exporting {len(cfg.measure.depths) * len(cfg.measure.precisions)} models into {target} …")
    written = build_kit(arch, cfg, target, learngene=lg, force=force)
    tarball = written.with_name(written.name + ".tar.gz")
    if json_:
        emit_json({"kit": str(written), "tarball": str(tarball), "device": device, "backend": backend,
                   "precisions": list(cfg.measure.precisions), "depths": list(cfg.measure.depths)})
        return
    need = "trtexec (JetPack has it)" if backend == "tensorrt" else "python3 with onnxruntime and numpy"
    out.print(f"wrote {written} and {tarball}\n"
              f"on the device ({need}):  tar xzf {tarball.name} && sh {written.name}/run.sh\n"
              f"then, here, with {written.name}/results copied back:  tleg-deploy profile --from-kit {written} "
              f"-o profiles/{device}.json\n"
              f"or in one go over SSH:  tleg-deploy profile --device {device} --backend {backend} --ssh user@host",
              highlight=False)


def kit_profile(*, device: str, backend: str, precision: str | None, depths: str, batch: int, threads: int,
                spec: str | None, from_kit: Path | None, ssh: str | None, ssh_config: Path | None,
                remote_python: str | None, output: Path | None, quiet: bool, memory: bool = True,
                clock: str = "wall", rounds: int | None = None, repeats: int = 1) -> tuple[DeviceProfile, Path]:
    """``profile --from-kit DIR`` (import) or ``profile --ssh user@host`` (make a kit, run it there,
    import it): the measured profile, written to ``output`` (default ``profiles/DEVICE.json``).
    ``memory``/``clock``/``rounds``: as ``MeasureConfig`` (the tests time CPU time on a shared machine);
    ``repeats``: the kit's (``KitConfig.repeats``), pooled by the import."""
    from tleg_deploy.errors import TlegError
    from tleg_deploy.profile.kit_import import import_kit
    from tleg_deploy.profile.registry import HOST
    from tleg_deploy.profile.remote import SshRun, SshTarget, profile_over_ssh

    if from_kit is not None:
        if ssh is not None:
            raise TlegError("give --from-kit or --ssh, not both")
        result = import_kit(from_kit, name=None if device == HOST else device)
    else:
        if device == HOST:
            raise TlegError("--ssh measures another machine: name it", hint="e.g. --device orin --ssh user@orin")
        run = SshRun(SshTarget.parse(ssh or ""), ssh_config, remote_python)
        arch, lg = spec_and_learngene(spec, None)
        cfg = kit_config(device, backend, precision, depths, batch, threads, rounds, not memory, clock, repeats)
        say = (lambda line: None) if quiet else (lambda line: err.print(line, highlight=False, markup=False))
        result = profile_over_ssh(arch, cfg, run, learngene=lg, progress=say)
    output = output or Path("profiles") / f"{result.name}.json"
    result = merge_into(result, output)
    result.save(output)
    return result, output
