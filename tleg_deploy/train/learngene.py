"""``train_learngene``: learn a learngene by training its Aux-Net with soft distillation.

TLEG (Xia et al., AAAI 2024, §3.2): the Aux-Net is one block applied ``aux_depth`` times with
parameters ``base + (i/aux_depth)·slope``; it is trained end to end against a teacher's soft labels
(KL at temperature ``tau`` mixed with cross-entropy by ``alpha``; the paper uses ``alpha=1, tau=1``).
The teacher is any plain ViT: a model, or a descendant ``.safetensors`` file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tleg_deploy.errors import SpecError
from tleg_deploy.model.auxnet import AuxNet
from tleg_deploy.model.expansion import load_descendant
from tleg_deploy.model.finite import check_finite
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import ViT
from tleg_deploy.train.finetune import splits
from tleg_deploy.train.loop import TrainConfig, evaluate, fit
from tleg_deploy.train.losses import DistillationLoss


@dataclass
class LearngeneResult:
    learngene: Learngene
    metrics: dict[str, Any]        # aux_val_acc, aux_test_acc, teacher_test_acc, epochs, seconds, ...
    history: list[dict[str, Any]] = field(default_factory=list)


def train_learngene(
    data: str, teacher: ViT | str | os.PathLike[str], *, epochs: int, spec: ViTSpec | None = None,
    aux_depth: int = 12, learngene: Learngene | None = None, alpha: float = 1.0, tau: float = 1.0,
    lr: float = 1e-3, batch_size: int = 64, seed: int = 0, quiet: bool = True, weight_decay: float = 0.05,
    warmup_epochs: float = 1.0, min_lr: float = 1e-5, clip_grad: float | None = None, augment: bool = False,
    device: str | None = None, run_dir: str | os.PathLike[str] | None = None, resume: bool = False,
) -> LearngeneResult:
    """Train ``AuxNet(learngene)`` (default: ``Learngene.init(spec, aux_depth, seed)``) on ``data``
    distilling from ``teacher``; returns the trained learngene with its provenance filled in."""
    teacher_meta: dict[str, Any] = {}
    if not isinstance(teacher, ViT):
        teacher_meta["file"] = str(teacher)
        teacher, _ = load_descendant(teacher)
    check_finite("teacher", teacher.state_dict(), hint="a teacher with NaN or infinite weights cannot teach")
    if learngene is not None:  # the Aux-Net trains its tensors in place: work on a copy
        copy = lambda d: {k: v.detach().clone() for k, v in d.items()}  # noqa: E731
        lg = Learngene(learngene.spec, learngene.aux_depth, copy(learngene.shared), copy(learngene.base),
                       copy(learngene.slope), dict(learngene.provenance))
    else:
        lg = Learngene.init(spec or teacher.spec, aux_depth, seed)
    for f in ("img_size", "patch_size", "in_chans", "num_classes"):
        if getattr(teacher.spec, f) != getattr(lg.spec, f):
            raise SpecError(f"teacher {f}={getattr(teacher.spec, f)} differs from the learngene's "
                            f"{getattr(lg.spec, f)}", hint="distill from a teacher trained on the same data")
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                      warmup_epochs=warmup_epochs, min_lr=min_lr, clip_grad=clip_grad, seed=seed,
                      augment=augment, device=device)
    train, val, test = splits(data, lg.spec)
    aux = AuxNet(lg)
    res = fit(aux, DistillationLoss(teacher, alpha, tau), train, val, cfg, test=test,
              run_dir=Path(run_dir) if run_dir else None, resume=resume, quiet=quiet, label="aux-net",
              extra_config={"data": data, "aux_depth": lg.aux_depth, "alpha": alpha, "tau": tau})
    dev = next(aux.parameters()).device
    teacher_meta |= {"spec": teacher.spec.to_dict(), "depth": teacher.depth,
                     "test_acc": evaluate(teacher, test, dev), "params": sum(p.numel() for p in teacher.parameters())}
    metrics = {
        "aux_val_acc": evaluate(aux, val, dev), "aux_test_acc": evaluate(aux, test, dev),
        "teacher_test_acc": teacher_meta["test_acc"], "epochs": epochs, "seconds": res.seconds,
        "train_images": res.train_images, "resumed_from_epoch": res.resumed_from,
        "final_train_loss": res.history[-1]["train_loss"] if res.history else None,
    }
    out = aux.cpu().to_learngene()
    out.provenance = {
        "made_by": "train_learngene", "trained": True, "data": data, "seed": seed, "epochs": epochs,
        "lr": lr, "batch_size": batch_size, "alpha": alpha, "tau": tau, "aux_depth": lg.aux_depth,
        "teacher": teacher_meta, "aux_val_acc": metrics["aux_val_acc"], "aux_test_acc": metrics["aux_test_acc"],
        "seconds": round(res.seconds, 1),
    }
    return LearngeneResult(out, metrics, res.history)
