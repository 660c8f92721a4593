"""``extract_learngene``: a least-squares learngene from a trained plain ViT.

TLEG's core observation is that the parameters of trained ViT layers change roughly linearly with
depth. Given a depth-``L`` model, we fit ``theta_i ≈ base + (i / L) · slope`` per tensor element
with the paper's coefficients ``c_i = i / L`` (closed-form simple linear regression over layers) and
report, per block tensor, how much of the across-layer variance the line explains (R²). This lets
users turn their own trained ViTs into learngenes — something the paper does not offer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tleg_deploy.errors import FormatError
from tleg_deploy.files.tensorfile import check_tensors
from tleg_deploy.model.expansion import descendant_shapes
from tleg_deploy.model.finite import check_finite
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec, check_depth
from tleg_deploy.model.vit import block_param_shapes, shared_param_shapes

ModelSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike[str]


@dataclass(frozen=True)
class ExtractionReport:
    """Per block tensor that varies across layers: R² of the linear fit (1.0 = perfectly linear).

    A tensor that is the same in every layer (e.g. LayerNorm weights never trained away from their
    init) has no across-layer variance to explain: its R² is undefined, so it is listed in
    ``constant`` and left out of ``r2`` and the mean, which would otherwise count it as a perfect fit.
    """

    depth: int
    r2: dict[str, float]
    constant: tuple[str, ...] = ()

    @property
    def mean_r2(self) -> float | None:
        """Mean R² over the tensors that vary across layers; ``None`` if none varies."""
        return sum(self.r2.values()) / len(self.r2) if self.r2 else None

    @property
    def min_r2(self) -> tuple[str, float] | None:
        if not self.r2:
            return None
        name = min(self.r2, key=self.r2.__getitem__)
        return name, self.r2[name]

    def summary(self) -> str:
        """One line for users: the mean over varying tensors and which ones were left out."""
        mean = "n/a" if self.mean_r2 is None else f"{self.mean_r2:.3f}"
        line = f"from depth {self.depth}, mean R² {mean} over {len(self.r2)} tensors that vary across layers"
        if self.constant:
            line += (f"; {len(self.constant)} constant across layers (R² undefined, not counted): "
                     f"{', '.join(self.constant)}")
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "mean_r2": self.mean_r2, "r2": self.r2,
                "constant": list(self.constant)}


# Across-layer spread below this fraction of a tensor's RMS counts as constant (float round-off).
_CONSTANT_REL = 1e-6


def extract_learngene(
    source: ModelSource, spec: ViTSpec, aux_depth: int | None = None
) -> tuple[Learngene, ExtractionReport]:
    """Fit a learngene to the blocks of a trained plain ViT of ``spec``.

    ``source`` is a module, a state dict, or a path to a safetensors file with timm key names.
    ``aux_depth`` defaults to the model's depth.
    """
    state = _state_dict(source)
    depth = _depth_of(state, spec)
    where = source if isinstance(source, (str, os.PathLike)) else "model"
    check_finite(where, state, hint="a model with NaN or infinite weights has no learngene; "
                 "check the training run that made it")
    shared = {k: state[k].detach().float().clone() for k in shared_param_shapes(spec)}
    coef = torch.arange(depth, dtype=torch.float64) / depth  # c_i = i / L
    c_centred = coef - coef.mean()
    base: dict[str, torch.Tensor] = {}
    slope: dict[str, torch.Tensor] = {}
    r2: dict[str, float] = {}
    constant: list[str] = []
    for name in block_param_shapes(spec):
        y = torch.stack([state[f"blocks.{i}.{name}"].detach().double() for i in range(depth)])
        y_mean = y.mean(0)
        view = (-1,) + (1,) * (y.ndim - 1)
        s = (c_centred.view(view) * (y - y_mean)).sum(0) / (c_centred**2).sum()
        b = y_mean - s * coef.mean()
        residual = y - (b + coef.view(view) * s)
        ss_res = float((residual**2).sum())
        ss_tot = float(((y - y_mean) ** 2).sum())
        if ss_tot <= _CONSTANT_REL**2 * float((y**2).sum()):
            constant.append(name)
        else:
            r2[name] = 1.0 - ss_res / ss_tot
        base[name], slope[name] = b.float(), s.float()
    report = ExtractionReport(depth, r2, tuple(constant))
    provenance = {"made_by": "extract_learngene", "source_depth": depth, "mean_r2": report.mean_r2,
                  "constant_tensors": len(constant)}
    lg = Learngene(spec, check_depth(aux_depth or depth), shared, base, slope, provenance)
    return lg, report


def _state_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise FormatError(f"{path} is not a readable safetensors file: {e}") from None


def _depth_of(state: dict[str, torch.Tensor], spec: ViTSpec) -> int:
    indices = {int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    depth = max(indices) + 1 if indices else 0
    if depth < 2:
        raise FormatError(
            f"extraction needs a model with at least 2 blocks, found {depth}",
            hint="a line through one layer is not determined",
        )
    check_tensors("model state dict", state, descendant_shapes(spec, depth))
    return depth
