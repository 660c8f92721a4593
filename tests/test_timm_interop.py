"""Descendants load strictly into timm's ``VisionTransformer`` and compute the same logits, in both head
layouts (``ViTSpec.fc_norm``). Skipped where timm does not import (it does not beside the project's
torch 2.13 CPU); run by hand in a venv with timm, e.g.
``PYTHONPATH=. /path/to/timm-venv/bin/python -m pytest tests/test_timm_interop.py``.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from tleg_deploy.model.expansion import expand, save_descendant
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def _timm_model(spec: ViTSpec, depth: int) -> nn.Module:
    return timm_vit.VisionTransformer(
        img_size=spec.img_size, patch_size=spec.patch_size, in_chans=spec.in_chans, num_classes=spec.num_classes,
        embed_dim=spec.embed_dim, depth=depth, num_heads=spec.num_heads, mlp_ratio=spec.mlp_ratio,
        qkv_bias=spec.qkv_bias, class_token=False, global_pool="avg", fc_norm=spec.fc_norm,
        norm_layer=partial(nn.LayerNorm, eps=spec.norm_eps),
    )


@pytest.mark.parametrize("fc_norm", [False, True])
@pytest.mark.parametrize("depth", [1, 5])
def test_timm_loads_a_descendant_strictly_and_agrees(tiny_lg: Learngene, tmp_path: Path, fc_norm: bool,
                                                     depth: int) -> None:
    from safetensors.torch import load_file

    ours = expand(tiny_lg, depth, fc_norm=fc_norm).eval()
    spec = ours.spec
    assert spec.fc_norm is fc_norm
    save_descendant(ours, tmp_path / "d.safetensors", tiny_lg.sha256())
    theirs = _timm_model(spec, depth).eval()
    theirs.load_state_dict(load_file(str(tmp_path / "d.safetensors")), strict=True)
    x = torch.randn(4, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)


def test_the_two_layouts_are_not_interchangeable_in_timm(tiny_lg: Learngene) -> None:
    """A pre-pool-norm descendant does not load into timm's fc_norm model: the layouts are told apart."""
    theirs = _timm_model(dataclasses.replace(tiny_lg.spec, fc_norm=True), 2)
    with pytest.raises(RuntimeError, match="fc_norm"):
        theirs.load_state_dict(expand(tiny_lg, 2).state_dict(), strict=True)
