"""``finetune``: train a descendant (or any plain ViT) with no linear constraint; ``train_teacher`` is
the same from the standard random init. Cross-entropy on the data's train split; the model of the
last epoch is kept (no selection on the test set); accuracy is reported on val and test."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import ViT, init_vit_
from tleg_deploy.train.data import load_data
from tleg_deploy.train.loop import Split, TrainConfig, evaluate, fit
from tleg_deploy.train.losses import CrossEntropy


@dataclass
class FinetuneResult:
    model: ViT
    metrics: dict[str, Any]       # val_acc, test_acc, epochs, seconds, train_images, ...
    history: list[dict[str, Any]] = field(default_factory=list)


def splits(data: str, spec: ViTSpec) -> tuple[Split, Split, Split]:
    return tuple(Split(*load_data(data, spec, s)) for s in ("train", "val", "test"))  # type: ignore[return-value]


def finetune(
    model: ViT, data: str, *, epochs: int, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
    quiet: bool = True, weight_decay: float = 0.05, warmup_epochs: float = 1.0, min_lr: float = 1e-5,
    clip_grad: float | None = None, augment: bool = False, device: str | None = None,
    run_dir: str | os.PathLike[str] | None = None, resume: bool = False, track_test: bool = False,
    label: str = "finetune",
) -> FinetuneResult:
    """Train ``model`` (in place) on ``data`` for ``epochs`` epochs; returns it with its metrics."""
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, min_lr=min_lr, clip_grad=clip_grad, seed=seed,
                      augment=augment, device=device, track_test=track_test)
    train, val, test = splits(data, model.spec)
    res = fit(model, CrossEntropy(), train, val, cfg, test=test, run_dir=Path(run_dir) if run_dir else None,
              resume=resume, quiet=quiet, label=label, extra_config={"data": data, "depth": model.depth})
    device_ = next(model.parameters()).device
    metrics = {
        "val_acc": evaluate(model, val, device_), "test_acc": evaluate(model, test, device_),
        "epochs": epochs, "seconds": res.seconds, "train_images": res.train_images,
        "resumed_from_epoch": res.resumed_from, "final_train_loss": res.history[-1]["train_loss"] if res.history
        else None,
    }
    return FinetuneResult(model, metrics, res.history)


def train_teacher(
    data: str, spec: ViTSpec, depth: int, *, epochs: int, seed: int = 0, **kwargs: Any
) -> FinetuneResult:
    """A plain ViT trained from the standard random init: the teacher for Aux-Net distillation."""
    model = init_vit_(ViT(spec, depth), torch.Generator().manual_seed(seed))
    return finetune(model, data, epochs=epochs, seed=seed, label="teacher", **kwargs)
