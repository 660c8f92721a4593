"""``import_tleg_checkpoint``: the official TLEG Aux-Net checkpoint → ``Learngene``.

The authors' code (github.com/AlphaXia/TLEG, built on MiniViT's weight-multiplexing ViT) keeps one
shared block whose layers hold ``*_base`` (intercept) and ``*_ilayer`` (slope) tensors under
``blocks.block.<sub>.instances.0.{weight,bias}_{base,ilayer}``, plus ``pos_embed``, ``patch_embed``,
``norm`` and ``head``; no class token, mean pooling, and layer ``i`` = ``base + (i/12)·ilayer``.
Their ``main.py`` saves ``{'model': ..., 'model_ema': ..., 'optimizer': ..., 'args': ...}``.

We read it with ``torch.load(weights_only=True)`` (only ``argparse.Namespace`` allowed beyond
tensors) and match the key set exactly: the official loader's ``strict=False`` would silently
ignore a mismatch, we refuse it. Their final norm uses LayerNorm's default eps 1e-5 where our
spec uses one ``norm_eps`` (1e-6 for DeiT): outputs differ by well under 1e-4.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from tleg_deploy.errors import CheckpointError, SpecError
from tleg_deploy.model.finite import check_finite
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import block_param_shapes

_PREFIX = "blocks.block."
_SHARED = ("pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
           "norm.weight", "norm.bias", "head.weight", "head.bias")


def official_key(block_param: str, part: str) -> str:
    """``attn.qkv.weight``, ``base`` -> ``blocks.block.attn.qkv.instances.0.weight_base``."""
    sub, kind = block_param.rsplit(".", 1)
    return f"{_PREFIX}{sub}.instances.0.{kind}_{part}"


def import_tleg_checkpoint(
    path: str | os.PathLike[str], *, aux_depth: int = 12, num_heads: int | None = None,
    use_ema: bool = False,
) -> Learngene:
    """Convert an official TLEG Aux-Net checkpoint (``checkpoint.pth`` or a bare state dict).

    Shapes fix everything in the spec but the head count; ``num_heads`` defaults to DeiT's
    ``embed_dim // 64``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    obj = _load(p)
    state = _pick_state(obj, use_ema, p)
    spec = _infer_spec(state, num_heads, p)
    expected = set(_SHARED)
    names = block_param_shapes(spec)
    expected |= {official_key(n, part) for n in names for part in ("base", "ilayer")}
    missing = sorted(expected - set(state))
    extra = sorted(set(state) - expected)
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(
            f"{p} does not match the TLEG Aux-Net layout: {what} "
            f"({len(missing)} missing, {len(extra)} unexpected)",
            hint="is this an Aux-Net checkpoint of aux_deit_{tiny,small,base}_patch16_224?",
        )
    # float32 copies under the official names, checked before they become a learngene (a float64
    # value beyond float32's range turns into inf here).
    wanted = list(_SHARED) + [official_key(n, part) for n in names for part in ("base", "ilayer")]
    f32 = {k: state[k].float().clone() for k in wanted}
    check_finite(p, f32, hint="the checkpoint is corrupted or its training diverged")
    shared = {k: f32[k] for k in _SHARED}
    base = {n: f32[official_key(n, "base")] for n in names}
    slope = {n: f32[official_key(n, "ilayer")] for n in names}
    provenance = {"made_by": "import_tleg_checkpoint", "source": p.name, "ema": use_ema}
    try:
        return Learngene(spec, aux_depth, shared, base, slope, provenance)
    except Exception as e:  # shapes that disagree with one another
        raise CheckpointError(f"{p} has inconsistent tensor shapes: {e}") from None


def _load(p: Path) -> object:
    """``torch.load(weights_only=True)`` with its failures worded for users: an unsafe pickle is
    refused without torch's advice to turn the safety off."""
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p} is empty", hint="pass the checkpoint.pth the TLEG code saved")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if found := re.search(r"GLOBAL (\S+)", text):
            raise CheckpointError(
                f"{p} contains Python objects ({found.group(1)}) that tleg-deploy does not load, for safety",
                hint="re-save it as a plain state dict of tensors, e.g. torch.save({'model': model.state_dict()}, "
                     "'plain.pth'), where you trust the file",
            ) from None
        # Not torch's advice to turn the safety off: only what the unpickler tripped on.
        reason = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint"
                              + (f" ({reason[0][:200]})" if reason else "")) from None
    except Exception as e:
        raise CheckpointError(f"{p} is not a readable PyTorch checkpoint: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _pick_state(obj: object, use_ema: bool, p: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "model" in obj:
        key = "model_ema" if use_ema else "model"
        if key not in obj:
            raise CheckpointError(f"{p} has no {key!r} entry", hint="drop --ema")
        obj = obj[key]
    elif use_ema:
        raise CheckpointError(f"{p} is a bare state dict with no EMA weights", hint="drop --ema")
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{p} holds no state dict of tensors")
    return obj


def _infer_spec(state: Mapping[str, torch.Tensor], num_heads: int | None, p: Path) -> ViTSpec:
    try:
        _, n_tokens, dim = state["pos_embed"].shape
        _, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        num_classes = state["head.weight"].shape[0]
        hidden = state[official_key("mlp.fc1.weight", "base")].shape[0]
        has_qkv_bias = official_key("attn.qkv.bias", "base") in state
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"{p} does not look like a TLEG Aux-Net checkpoint (missing or odd {e})"
        ) from None
    side = round(n_tokens**0.5)
    if side * side != n_tokens:
        raise CheckpointError(f"{p}: {n_tokens} position embeddings is not a square grid "
                              "(a class or distillation token?)")
    try:
        return ViTSpec(
            img_size=side * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim,
            num_heads=num_heads or max(1, dim // 64), mlp_ratio=hidden / dim,
            num_classes=num_classes, qkv_bias=has_qkv_bias,
        )
    except SpecError as e:
        raise CheckpointError(f"{p}: cannot form a spec: {e}") from None
