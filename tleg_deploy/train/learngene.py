"""``train_learngene``: learn a learngene by training its Aux-Net with soft distillation.

TLEG (Xia et al., AAAI 2024, §3.2): the Aux-Net is one block applied ``aux_depth`` times with
parameters ``base + (i/aux_depth)·slope``; it is trained end to end against a teacher's soft labels
(KL at temperature ``tau`` mixed with cross-entropy by ``alpha``; the paper uses ``alpha=1, tau=1``).
The teacher is any plain ViT: a model, or a descendant ``.safetensors`` file. The distillation's
settings are a ``DistillConfig``, the optimisation a ``TrainConfig`` and the run's checkpoint
directory and progress a ``RunOptions`` (``train.loop``), each frozen and validated when made.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from tleg_deploy.errors import SpecError, TlegError
from tleg_deploy.model.auxnet import AuxNet
from tleg_deploy.model.expansion import load_descendant
from tleg_deploy.model.finite import check_finite
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.model.vit import ViT
from tleg_deploy.train.data import data_card
from tleg_deploy.train.finetune import splits
from tleg_deploy.train.loop import RunOptions, TrainConfig, evaluate, run_training
from tleg_deploy.train.losses import DistillationLoss


@dataclass(frozen=True)
class DistillConfig:
    """The Aux-Net's depth (for a fresh learngene; a given one keeps its own) and the loss:
    ``(1 - alpha)·CE + alpha·tau²·KL(teacher ‖ student)`` at temperature ``tau`` (TLEG: 1, 1)."""

    aux_depth: int = 12
    alpha: float = 1.0
    tau: float = 1.0

    def __post_init__(self) -> None:
        check_depth(self.aux_depth, maximum=MAX_DEPTH)
        if not 0.0 <= self.alpha <= 1.0:
            raise TlegError(f"alpha {self.alpha!r} must be in [0, 1]", hint="1 = soft distillation only (TLEG)")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise TlegError(f"temperature tau {self.tau!r} must be a positive number", hint="TLEG uses 1")


@dataclass
class LearngeneResult:
    learngene: Learngene
    metrics: dict[str, Any]        # aux_val_acc, aux_test_acc, teacher_test_acc, epochs, seconds, ...
    history: list[dict[str, Any]] = field(default_factory=list)


def train_learngene(
    data: str, teacher: ViT | str | os.PathLike[str], cfg: TrainConfig, distill: DistillConfig = DistillConfig(),
    opts: RunOptions = RunOptions(), *, spec: ViTSpec | None = None, learngene: Learngene | None = None,
) -> LearngeneResult:
    """Train ``AuxNet(learngene)`` (default: ``Learngene.init(spec or the teacher's, distill.aux_depth,
    cfg.seed)``) on ``data`` distilling from ``teacher``; returns the trained learngene with its
    provenance filled in."""
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
        lg = Learngene.init(spec or teacher.spec, distill.aux_depth, cfg.seed)
    for f in ("img_size", "patch_size", "in_chans", "num_classes"):
        if getattr(teacher.spec, f) != getattr(lg.spec, f):
            raise SpecError(f"teacher {f}={getattr(teacher.spec, f)} differs from the learngene's "
                            f"{getattr(lg.spec, f)}", hint="distill from a teacher trained on the same data")
    train, val, test = splits(data, lg.spec)
    aux = AuxNet(lg)
    res = run_training(aux, DistillationLoss(teacher, distill.alpha, distill.tau), train, val, cfg, opts,
                       test=test, label="aux-net",
                       extra_config={"data": data, "aux_depth": lg.aux_depth, "alpha": distill.alpha,
                                     "tau": distill.tau})
    dev = next(aux.parameters()).device
    teacher_meta |= {"spec": teacher.spec.to_dict(), "depth": teacher.depth,
                     "test_acc": evaluate(teacher, test, dev), "params": sum(p.numel() for p in teacher.parameters())}
    metrics = {
        "aux_val_acc": evaluate(aux, val, dev), "aux_test_acc": evaluate(aux, test, dev),
        "teacher_test_acc": teacher_meta["test_acc"], "epochs": cfg.epochs, "seconds": res.seconds,
        "train_images": res.train_images, "resumed_from_epoch": res.resumed_from,
        "final_train_loss": res.history[-1]["train_loss"] if res.history else None,
    }
    out = aux.cpu().to_learngene()
    out.data = data_card(data, lg.spec)  # class names and preprocessing travel with the learngene
    out.provenance = {
        "made_by": "train_learngene", "trained": True, "data": data, "seed": cfg.seed, "epochs": cfg.epochs,
        "lr": cfg.lr, "batch_size": cfg.batch_size, "alpha": distill.alpha, "tau": distill.tau,
        "aux_depth": lg.aux_depth,
        "teacher": teacher_meta, "aux_val_acc": metrics["aux_val_acc"], "aux_test_acc": metrics["aux_test_acc"],
        "seconds": round(res.seconds, 1),
    }
    return LearngeneResult(out, metrics, res.history)
