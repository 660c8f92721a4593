"""The learngene: an intercept (``base``) and a ``slope`` for every block parameter, plus the shared
stem, position embedding, final norm and head (TLEG, Xia et al., AAAI 2024, arXiv 2312.05614).

Layer ``i`` of a depth-``L`` model is ``base + (i / L) * slope`` (``tleg_deploy.model.expansion``). The
initialization follows the official code: linear bases and slopes truncated-normal with std 0.02,
linear biases 0; LayerNorm weight base 1, every other LayerNorm tensor 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tleg_deploy.errors import FormatError, SpecError
from tleg_deploy.files.datacard import META_KEY, DataCard, card_from_metadata
from tleg_deploy.files.tensorfile import check_tensors, read_tensor_file, write_tensor_file
from tleg_deploy.model.finite import check_finite, check_float32
from tleg_deploy.model.spec import ViTSpec, check_depth
from tleg_deploy.model.vit import ViT, block_param_shapes, is_norm_param, shared_param_shapes

FORMAT = "tleg-learngene"
RULE = "i/L"
_META_KEYS = {"spec", "aux_depth", "rule", "provenance"}


@dataclass
class Learngene:
    """``shared`` is keyed by ViT names (``pos_embed``, ``head.weight``), ``base`` and ``slope`` by
    block-relative names (``attn.qkv.weight``), so block ``i`` is ``blocks.{i}.<name>``."""

    spec: ViTSpec
    aux_depth: int
    shared: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    slope: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    data: DataCard | None = None  # class names and preprocessing of the data it was trained on

    def __post_init__(self) -> None:
        check_depth(self.aux_depth)
        check_tensors("learngene", self.tensors(), self.expected_shapes(self.spec))
        check_finite("learngene", self.tensors())

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def init(cls, spec: ViTSpec, aux_depth: int, seed: int = 0) -> Learngene:
        """The paper's initialization, reproducible from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        stem = ViT(spec, depth=0)
        shared = {
            name: _init_tensor(name, p.shape, g, torch_default_bound=name == "patch_embed.proj.weight")
            for name, p in stem.named_parameters()
        }
        shapes = block_param_shapes(spec)
        base = {name: _init_tensor(name, shape, g) for name, shape in shapes.items()}
        slope = {name: _init_tensor(name, shape, g, slope=True) for name, shape in shapes.items()}
        provenance = {"made_by": "Learngene.init", "seed": seed, "trained": False}
        return cls(spec, aux_depth, shared, base, slope, provenance)

    @staticmethod
    def expected_shapes(spec: ViTSpec) -> dict[str, tuple[int, ...]]:
        shapes = {f"shared.{k}": v for k, v in shared_param_shapes(spec).items()}
        for name, shape in block_param_shapes(spec).items():
            shapes[f"base.{name}"] = shape
            shapes[f"slope.{name}"] = shape
        return shapes

    # -- views ----------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """All tensors under their file names: ``shared.*``, ``base.*``, ``slope.*``."""
        out = {f"shared.{k}": v for k, v in self.shared.items()}
        out |= {f"base.{k}": v for k, v in self.base.items()}
        out |= {f"slope.{k}": v for k, v in self.slope.items()}
        return out

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def sha256(self) -> str:
        """Content hash over spec, aux depth and every tensor's name, dtype, shape and bytes;
        independent of file layout and provenance."""
        h = hashlib.sha256()
        h.update(self.spec.to_json().encode())
        h.update(f"aux_depth={self.aux_depth};rule={RULE}".encode())
        for name, t in sorted(self.tensors().items()):
            t = t.detach().contiguous().cpu()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def layer_tensors(self, i: int, depth: int) -> dict[str, torch.Tensor]:
        """Block-relative tensors of layer ``i`` of a depth-``depth`` model: ``base + (i/L)·slope``."""
        coef = i / depth
        # (slope * coef) += base: one allocation, and bit-identical to base + coef * slope.
        return {k: torch.mul(self.slope[k], coef).add_(self.base[k]) for k in self.base}

    # -- files ----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the learngene (float32, finite tensors only) atomically to ``path``."""
        tensors = self.tensors()
        check_float32("learngene", tensors, hint="cast with .float() before saving")
        check_finite("learngene", tensors, hint="the learngene diverged or was corrupted; not saved")
        meta = {
            "spec": self.spec.to_json(),
            "aux_depth": str(self.aux_depth),
            "rule": RULE,
            "provenance": json.dumps(self.provenance, sort_keys=True),
        }
        if self.data is not None:
            meta[META_KEY] = self.data.to_json()
        write_tensor_file(path, tensors, FORMAT, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Learngene:
        tensors, meta = read_tensor_file(path, FORMAT, _META_KEYS, frozenset({META_KEY}))
        if meta["rule"] != RULE:
            raise FormatError(f"{path} uses expansion rule {meta['rule']!r}; we implement {RULE!r}")
        try:
            spec = ViTSpec.from_json(meta["spec"])
            aux_depth = int(meta["aux_depth"])
            provenance = json.loads(meta["provenance"])
            card = card_from_metadata(meta, path)
        except (SpecError, ValueError) as e:
            raise FormatError(f"{path} has invalid metadata: {e}") from None
        check_tensors(path, tensors, cls.expected_shapes(spec))
        check_float32(path, tensors, hint="learngene files are float32; re-save it with tensors cast by .float()")
        check_finite(path, tensors)
        pick = lambda prefix: {  # noqa: E731
            k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)
        }
        return cls(spec, aux_depth, pick("shared."), pick("base."), pick("slope."), provenance, card)

    def describe(self) -> dict[str, Any]:
        """Facts for ``tleg-deploy info``."""
        per_block = sum(t.numel() for t in self.base.values())
        shared = sum(t.numel() for t in self.shared.values())
        return {
            "kind": "learngene",
            "spec": self.spec.to_dict(),
            "spec_preset": self.spec.preset_name(),
            "aux_depth": self.aux_depth,
            "rule": RULE,
            "params": self.num_params(),
            "bytes": self.nbytes(),
            "params_per_block": per_block,
            "params_shared": shared,
            "sha256": self.sha256(),
            "provenance": self.provenance,
            "data": None if self.data is None else self.data.to_dict(),
        }


def _init_tensor(
    name: str, shape: torch.Size | tuple[int, ...], g: torch.Generator, *, slope: bool = False,
    torch_default_bound: bool = False,
) -> torch.Tensor:
    t = torch.empty(tuple(shape))
    if is_norm_param(name):
        return t.fill_(1.0 if name.endswith("weight") and not slope else 0.0)
    if name.endswith("bias"):
        return t.zero_()
    if torch_default_bound:  # PyTorch's default Conv2d init, U(±1/sqrt(fan_in)), kept by the official code for the stem
        fan_in = math.prod(tuple(shape)[1:])
        bound = 1.0 / fan_in**0.5
        return t.uniform_(-bound, bound, generator=g)
    return nn.init.trunc_normal_(t, std=0.02, a=-2.0, b=2.0, generator=g)
