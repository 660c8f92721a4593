"""Training commands: ``train-teacher``, ``train-learngene``, ``finetune``. Each also runs unchanged
under ``torchrun --nproc_per_node=N`` (only rank 0 writes or prints). Checkpoints and
``metrics.jsonl`` go to ``<output>.run/``; ``--resume`` continues from there."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tleg_deploy.cli.app import (
    DepthOpt,
    ForceOpt,
    JsonOpt,
    LearngeneOpt,
    QuietOpt,
    SpecOpt,
    command,
    data_path,
    emit_json,
    err,
    out,
)
from tleg_deploy.model.spec import MAX_DEPTH

if TYPE_CHECKING:
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.train.loop import RunOptions, TrainConfig

DataOpt = Annotated[str, typer.Option("--data", help="digits, folder:PATH (ImageFolder) or npz:PATH.")]
EpochsOpt = Annotated[int, typer.Option("--epochs", "-e", min=1, help="Training epochs.")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="Peak AdamW learning rate (cosine, warm-up).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Global batch size (split over processes).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (init, shuffling).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from <output>.run/checkpoint.safetensors.")]
OutOpt = Annotated[str, typer.Option("--output", "-o", help=".safetensors file to write.")]
ClipOpt = Annotated[float | None, typer.Option("--clip-grad", min=0.0, help="Clip the gradient norm to this.")]
WarmupOpt = Annotated[float | None, typer.Option("--warmup", min=0.0,
                                                 help="Warm-up epochs (default: min(1, 0.1 x epochs)).")]
AugmentOpt = Annotated[bool, typer.Option("--augment/--no-augment", help="Random shifts of the training images.")]


def _destination(output: str, force: bool, resume: bool, data: str, *inputs: Path | None) -> Path:
    """The output file, checked now, not after the training (``files.outputs``); inputs must be files.
    ``--resume`` of a run that has its ``<output>.run/`` may replace that run's output."""
    from tleg_deploy.files.outputs import input_file, output_file

    files = [input_file(p) for p in inputs if p is not None]
    own_run = resume and Path(output).name not in ("", ".", "..") and Path(output).with_suffix(".run").is_dir()
    return output_file(output, inputs=[*files, data_path(data)], force=force or own_run)


def _common(epochs: int, lr: float, batch_size: int, seed: int, quiet: bool, output: Path, resume: bool,
            clip_grad: float | None, warmup: float | None, augment: bool) -> tuple[TrainConfig, RunOptions]:
    """The training options every command shares, as the loop's two configs (run state in <output>.run/)."""
    from tleg_deploy.train.loop import RunOptions, TrainConfig

    return (TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, clip_grad=clip_grad,
                        warmup_epochs=warmup, augment=augment),
            RunOptions(run_dir=output.with_suffix(".run"), resume=resume, quiet=quiet))


def _data_spec(data: str, spec: str | None, default: ViTSpec | None = None) -> ViTSpec:
    """The spec to train with: ``--spec`` if given, else ``default`` (the teacher's), else inferred from
    folder:/npz: data (``spec_text.infer_spec``, one line saying what), else ``digits``. Data whose
    channels or classes differ from it is refused; a resize is said (stderr, rank 0)."""
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.model.spec_text import INFER_BASE, infer_spec, parse_spec, spec_arg
    from tleg_deploy.train.data import check_data, describe_data
    from tleg_deploy.train.distributed import is_main_process

    lines = []
    if spec is not None:
        s = parse_spec(spec)
    elif default is not None:
        s = default
    elif data.partition(":")[0] in ("folder", "npz"):
        shape = describe_data(data)
        s = infer_spec(shape.img_size, shape.in_chans, shape.num_classes)
        lines.append(f"spec inferred from {data} ({shape.describe()}; width, heads and token grid of "
                     f"{INFER_BASE}): --spec {spec_arg(s)}")
    else:
        s = ViTSpec.preset("digits")
    lines += check_data(data, s)
    if is_main_process():
        for line in lines:
            err.print(f"[yellow]note[/yellow]: {line}", highlight=False, soft_wrap=True)
    return s


def _teacher_spec(teacher: Path) -> ViTSpec:
    """The teacher file's spec, from its header (no weights loaded); a file that is not a descendant
    fails here with ``load_descendant``'s error."""
    from tleg_deploy.errors import TlegError
    from tleg_deploy.files.fileio import safetensors_metadata
    from tleg_deploy.model.expansion import load_descendant
    from tleg_deploy.model.spec import ViTSpec

    try:
        return ViTSpec.from_json(safetensors_metadata(teacher).get("spec", ""))
    except (TlegError, ValueError, OSError):
        return load_descendant(teacher)[0].spec


def _report(result: dict[str, Any], json_: bool, text: str) -> None:
    from tleg_deploy.train.distributed import is_main_process

    if not is_main_process():
        return
    if json_:
        emit_json(result)
    else:
        out.print(text)


@command("train-teacher")
def train_teacher_cmd(
    output: OutOpt, depth: DepthOpt = 12,
    spec: SpecOpt = None,
    width: Annotated[int | None, typer.Option(min=1, help="Embedding width (default: the spec's).")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="Attention heads (default: the spec's).")] = None,
    data: DataOpt = "digits", epochs: EpochsOpt = 30, lr: LrOpt = 1e-3, batch_size: BatchOpt = 32, seed: SeedOpt = 0,
    clip_grad: ClipOpt = None, warmup: WarmupOpt = None, augment: AugmentOpt = False, resume: ResumeOpt = False,
    force: ForceOpt = False, quiet: QuietOpt = False, json_: JsonOpt = False,
) -> None:
    """Train a plain ViT from a random init, to serve as the Aux-Net's distillation teacher. Without
    --spec: the digits preset for digits data; for folder:/npz: data, the image size, channels and class
    count of the data on the digits preset's width, heads and 4x4 token grid (printed).

    Example: tleg-deploy train-teacher --width 96 --heads 6 --depth 12 --epochs 30 -o teacher.safetensors
    """
    from tleg_deploy.model.expansion import save_descendant
    from tleg_deploy.train.data import data_card
    from tleg_deploy.train.distributed import is_main_process
    from tleg_deploy.train.finetune import train_teacher

    dest = _destination(output, force, resume, data)
    s = _data_spec(data, spec)
    s = dataclasses.replace(s, embed_dim=width or s.embed_dim, num_heads=heads or s.num_heads)
    res = train_teacher(data, s, depth, *_common(epochs, lr, batch_size, seed, quiet, dest, resume, clip_grad,
                                                  warmup, augment))
    if is_main_process():
        save_descendant(res.model, dest, "", {"made_by": "train-teacher", "data": data, **res.metrics},
                        data=data_card(data, s))
    _report({"output": str(output), **res.metrics}, json_,
            f"wrote {output}: teacher depth {depth}, test accuracy {res.metrics['test_acc']:.1%}")


@command("train-learngene")
def train_learngene_cmd(
    output: OutOpt,
    teacher: Annotated[Path, typer.Option(help="Teacher: a plain ViT .safetensors (see train-teacher).")],
    spec: SpecOpt = None,
    aux_depth: Annotated[int, typer.Option(min=1, max=MAX_DEPTH, help="Aux-Net depth.")] = 12,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Weight of the soft-distillation term.")] = 1.0,
    tau: Annotated[float, typer.Option(min=0.0, help="Distillation temperature.")] = 1.0,
    data: DataOpt = "digits", epochs: EpochsOpt = 30, lr: LrOpt = 1e-3, batch_size: BatchOpt = 32, seed: SeedOpt = 0,
    clip_grad: ClipOpt = None, warmup: WarmupOpt = None, augment: AugmentOpt = False, resume: ResumeOpt = False,
    force: ForceOpt = False, quiet: QuietOpt = False, json_: JsonOpt = False,
) -> None:
    """Learn a learngene: train its Aux-Net with soft distillation from a teacher (TLEG, alpha=1, tau=1).
    Without --spec the learngene takes the teacher's spec.

    Example: tleg-deploy train-learngene --teacher teacher.safetensors --aux-depth 12 --epochs 30 -o lg.safetensors
    """
    from tleg_deploy.train.distributed import is_main_process
    from tleg_deploy.train.learngene import DistillConfig, train_learngene

    dest = _destination(output, force, resume, data, teacher)
    s = _data_spec(data, spec, _teacher_spec(teacher) if spec is None else None)
    cfg, opts = _common(epochs, lr, batch_size, seed, quiet, dest, resume, clip_grad, warmup, augment)
    res = train_learngene(data, teacher, cfg, DistillConfig(aux_depth=aux_depth, alpha=alpha, tau=tau), opts,
                          spec=s)
    if is_main_process():
        res.learngene.save(dest)
    _report({"output": str(output), "sha256": res.learngene.sha256(), **res.metrics}, json_,
            f"wrote {output}: Aux-Net test accuracy {res.metrics['aux_test_acc']:.1%} "
            f"(teacher {res.metrics['teacher_test_acc']:.1%})")


@command("finetune")
def finetune_cmd(
    output: OutOpt, depth: DepthOpt,
    learngene: LearngeneOpt = "demo",
    init: Annotated[str, typer.Option(help="tleg, scratch, weight-selection, base-only or mimetic.")] = "tleg",
    teacher: Annotated[Path | None, typer.Option(help="Teacher .safetensors for --init weight-selection.")] = None,
    data: DataOpt = "digits", epochs: EpochsOpt = 10, lr: LrOpt = 1e-3, batch_size: BatchOpt = 32, seed: SeedOpt = 0,
    clip_grad: ClipOpt = None, warmup: WarmupOpt = None, augment: AugmentOpt = False, resume: ResumeOpt = False,
    force: ForceOpt = False, quiet: QuietOpt = False, json_: JsonOpt = False,
) -> None:
    """Fine-tune a descendant of DEPTH blocks (no linear constraint) and save it.

    Example: tleg-deploy finetune --learngene demo --depth 6 --epochs 10 -o digits6.safetensors
    """
    from tleg_deploy.model.expansion import load_descendant, save_descendant
    from tleg_deploy.model.resources import learngene_path, load_learngene
    from tleg_deploy.train.data import data_card
    from tleg_deploy.train.distributed import is_main_process
    from tleg_deploy.train.finetune import finetune
    from tleg_deploy.train.inits import init_model

    dest = _destination(output, force, resume, data, learngene_path(learngene), teacher)
    lg = load_learngene(learngene)
    _data_spec(data, None, lg.spec)  # refuses data the learngene's spec cannot take; says if it resizes
    teacher_model = load_descendant(teacher)[0] if teacher is not None else None
    model = init_model(init, depth, learngene=lg, teacher=teacher_model, seed=seed)
    res = finetune(model, data, *_common(epochs, lr, batch_size, seed, quiet, dest, resume, clip_grad, warmup,
                                         augment))
    if is_main_process():
        derived = init in ("tleg", "base-only")  # the other inits do not come from the learngene
        save_descendant(res.model, dest, lg.sha256() if derived else "",
                        {"made_by": "finetune", "init": init, "data": data, "learngene": str(learngene), **res.metrics},
                        data=data_card(data, model.spec))
    _report({"output": str(output), "depth": depth, "init": init, **res.metrics}, json_,
            f"wrote {output}: depth {depth} ({init}), test accuracy {res.metrics['test_acc']:.1%}")
