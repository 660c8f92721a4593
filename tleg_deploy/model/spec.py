"""``ViTSpec``: the architecture of a learngene and of every model expanded from it.

Presets follow DeiT (Touvron et al., 2021): 224 px, patch 16, MLP ratio 4, with embed dim / heads
192/3 (tiny), 384/6 (small), 768/12 (base). ``digits`` is the bundled demo's spec, small enough to
train in seconds on two CPU cores on ``sklearn``'s 8x8 digits. Stdlib only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tleg_deploy.errors import DepthError, SpecError

MAX_DEPTH = 4096
"""Deepest model any command builds or profiles; a guard against typos like ``--depth 100000``."""


@dataclass(frozen=True)
class ViTSpec:
    """Everything but the depth: the depth is what a learngene leaves free."""

    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    num_classes: int
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    class_token: bool = False
    fc_norm: bool = False
    """Where the final LayerNorm sits. ``False`` (default): on every token before mean pooling, as
    the Aux-Net computes it (timm ``fc_norm=False``, tensors ``norm.*``). ``True``: on the pooled
    vector, as the official TLEG descendants do (timm ``global_pool='avg', fc_norm=True``, tensors
    ``fc_norm.*``)."""

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "num_heads", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SpecError(f"spec field {name}={value!r} must be a positive integer")
        if self.img_size % self.patch_size:
            raise SpecError(
                f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads:
            raise SpecError(
                f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if not self.mlp_ratio > 0 or int(self.embed_dim * self.mlp_ratio) <= 0:
            raise SpecError(f"mlp_ratio {self.mlp_ratio!r} must be positive")
        if not 0 < self.norm_eps < 1:
            raise SpecError(f"norm_eps {self.norm_eps!r} must be in (0, 1)")
        for name in ("qkv_bias", "class_token", "fc_norm"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"spec field {name}={getattr(self, name)!r} must be true or false")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + int(self.class_token)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def preset(cls, name: str) -> ViTSpec:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise SpecError(
                f"unknown spec preset {name!r}", hint=f"choose one of {', '.join(PRESETS)}"
            ) from None

    def preset_name(self) -> str | None:
        """The preset this spec equals, if any."""
        for name, fields in PRESETS.items():
            if ViTSpec(**fields) == self:
                return name
        return None

    def to_dict(self) -> dict[str, Any]:
        """Every field, except those in ``_OMIT_WHEN_DEFAULT`` while they hold their default: files
        written before such a field existed keep the same spec JSON (and learngene sha256)."""
        data = dataclasses.asdict(self)
        for name, default in _OMIT_WHEN_DEFAULT.items():
            if data[name] == default:
                del data[name]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ViTSpec:
        if not isinstance(data, dict):
            raise SpecError(f"spec must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        extra = sorted(set(data) - names)
        missing = sorted(required - set(data))
        if extra:
            raise SpecError(f"spec has unknown key(s) {extra}")
        if missing:
            raise SpecError(f"spec is missing key(s) {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ViTSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None
        return cls.from_dict(data)


_OMIT_WHEN_DEFAULT: dict[str, Any] = {"fc_norm": False}


def _deit(embed_dim: int, num_heads: int) -> dict[str, Any]:
    return dict(
        img_size=224, patch_size=16, in_chans=3, embed_dim=embed_dim, num_heads=num_heads,
        mlp_ratio=4.0, num_classes=1000,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "deit-tiny": _deit(192, 3),
    "deit-small": _deit(384, 6),
    "deit-base": _deit(768, 12),
    # 8x8 grey digits, 2x2 patches -> 16 tokens of width 64.
    "digits": dict(
        img_size=8, patch_size=2, in_chans=1, embed_dim=64, num_heads=4, mlp_ratio=4.0,
        num_classes=10,
    ),
}


def check_depth(depth: object, *, minimum: int = 1, maximum: int = MAX_DEPTH) -> int:
    """Validate a depth given by a user; returns it as an ``int``."""
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise DepthError(f"depth must be an integer, got {depth!r}")
    if not minimum <= depth <= maximum:
        raise DepthError(
            f"depth {depth} is outside {minimum}..{maximum}",
            hint=f"choose a depth between {minimum} and {maximum}",
        )
    return depth
