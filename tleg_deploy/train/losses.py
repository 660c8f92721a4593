"""Soft distillation loss, as one small module (after facebookresearch/deit ``losses.py``).

``loss = (1 - alpha) * CE(student, y) + alpha * tau² * KL(softmax(teacher / tau) || softmax(student / tau))``

TLEG trains its Aux-Net with ``alpha = 1, tau = 1``: pure soft distillation (Xia et al., AAAI 2024,
following DeiT's ``soft`` mode). The teacher runs under ``no_grad`` in eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tleg_deploy.errors import TlegError


class DistillationLoss(nn.Module):
    def __init__(self, teacher: nn.Module, alpha: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise TlegError(f"distillation alpha {alpha!r} must be in [0, 1]")
        if not tau > 0:
            raise TlegError(f"distillation temperature tau {tau!r} must be positive")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.tau = alpha, tau

    def forward(self, inputs: Tensor, outputs: Tensor, labels: Tensor) -> Tensor:
        base = F.cross_entropy(outputs, labels) if self.alpha < 1.0 else outputs.new_zeros(())
        if self.alpha == 0.0:
            return base
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).float()
        t = self.tau
        kd = F.kl_div(
            F.log_softmax(outputs.float() / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean", log_target=True,
        ) * (t * t)
        return (1.0 - self.alpha) * base + self.alpha * kd


class CrossEntropy(nn.Module):
    """Plain supervised loss with the same ``(inputs, outputs, labels)`` signature."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, inputs: Tensor, outputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), labels, label_smoothing=self.label_smoothing)
