"""``finetune``: train a descendant (or any plain ViT) with no linear constraint; ``train_teacher`` is
the same from the standard random init. Cross-entropy on the data's train split; the model of the
last epoch is kept (no selection on the test set); accuracy is reported on val and test. The
optimisation is a ``TrainConfig``, the run's checkpoint directory and progress a ``RunOptions``
(both frozen and validated when made; ``train.loop``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import ViT, init_vit_
from tleg_deploy.train.data import load_data
from tleg_deploy.train.loop import RunOptions, Split, TrainConfig, evaluate, run_training
from tleg_deploy.train.losses import CrossEntropy


@dataclass
class FinetuneResult:
    model: ViT
    metrics: dict[str, Any]       # val_acc, test_acc, epochs, seconds, train_images, ...
    history: list[dict[str, Any]] = field(default_factory=list)


def splits(data: str, spec: ViTSpec) -> tuple[Split, Split, Split]:
    return tuple(Split(*load_data(data, spec, s)) for s in ("train", "val", "test"))  # type: ignore[return-value]


def finetune(
    model: ViT, data: str, cfg: TrainConfig, opts: RunOptions = RunOptions(), *, label: str = "finetune",
) -> FinetuneResult:
    """Train ``model`` (in place) on ``data`` (digits, folder:PATH or npz:PATH) for ``cfg.epochs``
    epochs; returns it with its metrics."""
    train, val, test = splits(data, model.spec)
    res = run_training(model, CrossEntropy(), train, val, cfg, opts, test=test, label=label,
                       extra_config={"data": data, "depth": model.depth})
    device_ = next(model.parameters()).device
    metrics = {
        "val_acc": evaluate(model, val, device_), "test_acc": evaluate(model, test, device_),
        "epochs": cfg.epochs, "seconds": res.seconds, "train_images": res.train_images,
        "resumed_from_epoch": res.resumed_from, "final_train_loss": res.history[-1]["train_loss"] if res.history
        else None,
    }
    return FinetuneResult(model, metrics, res.history)


def train_teacher(
    data: str, spec: ViTSpec, depth: int, cfg: TrainConfig, opts: RunOptions = RunOptions()
) -> FinetuneResult:
    """A plain ViT trained from the standard random init (seeded by ``cfg.seed``): the teacher for
    Aux-Net distillation."""
    model = init_vit_(ViT(spec, depth), torch.Generator().manual_seed(cfg.seed))
    return finetune(model, data, cfg, opts, label="teacher")
