"""``expand(lg, depth)``: the learngene's linear expansion into a plain ViT of any depth.

Block ``i`` (0-indexed) of a depth-``L`` model is ``base + (i / L) * slope`` — the official TLEG
code's rule (Xia et al., AAAI 2024), never ``i / (L - 1)``. The result is an ordinary ``ViT`` with
no learngene machinery inside, so export and profiling see a standard timm-layout model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from tleg_deploy.errors import FormatError, SpecError
from tleg_deploy.files.datacard import META_KEY, DataCard, card_from_metadata
from tleg_deploy.files.tensorfile import check_tensors, read_tensor_file, write_tensor_file
from tleg_deploy.model.finite import check_finite, check_float32, first_non_finite
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.model.vit import ViT, block_param_shapes, final_norm_name, shared_param_shapes

DESCENDANT_FORMAT = "tleg-descendant"
_DESCENDANT_META = {"spec", "depth", "learngene_sha256", "provenance"}


def expansion_state_dict(lg: Learngene, depth: int) -> dict[str, torch.Tensor]:
    """The timm-named state dict of the depth-``depth`` expansion (new tensors, not views)."""
    check_depth(depth, maximum=MAX_DEPTH)
    with torch.no_grad():
        state = {k: v.detach().clone() for k, v in lg.shared.items()}
        for i in range(depth):
            for name, t in lg.layer_tensors(i, depth).items():
                state[f"blocks.{i}.{name}"] = t.detach()
    if not _cannot_overflow(lg):  # a NaN put into the learngene after it was built, or absurd magnitudes
        check_finite(f"depth-{depth} expansion", state, hint="the learngene's base/slope are too large to expand")
    return state


def _cannot_overflow(lg: Learngene) -> bool:
    """Every ``base + c·slope`` (0 <= c < 1) is finite: all inputs finite and |base| + |slope| far from
    the float limit. Checking the learngene costs 1/depth of checking the expansion (which was 60%
    of a deit-base depth-12 ``expand``)."""
    for k, b in lg.base.items():
        s = lg.slope[k]
        bound = float(b.detach().abs().max()) + float(s.detach().abs().max()) if b.numel() else 0.0
        if not bound < torch.finfo(b.dtype).max / 2:  # also False for NaN
            return False
    return first_non_finite(lg.shared) is None


def expand(lg: Learngene, depth: int, drop_path_rate: float = 0.0, *, fc_norm: bool | None = None) -> ViT:
    """A plain ``ViT`` of ``depth`` blocks initialized from ``lg``.

    ``fc_norm`` (default: ``lg.spec.fc_norm``) chooses the head layout of the result; when it differs
    from the learngene's, the final-norm tensors move across (``norm.*`` <-> ``fc_norm.*``), as the
    official TLEG code's ``gene_tranfer`` does for its descendants. That changes what the head
    computes, so only the learngene's own layout reproduces its Aux-Net.
    """
    state = expansion_state_dict(lg, depth)
    spec = lg.spec
    if fc_norm is not None and fc_norm != spec.fc_norm:
        old, spec = final_norm_name(spec), dataclasses.replace(spec, fc_norm=fc_norm)
        for part in ("weight", "bias"):
            state[f"{final_norm_name(spec)}.{part}"] = state.pop(f"{old}.{part}")
    return vit_from_state(spec, depth, state, drop_path_rate=drop_path_rate)


def vit_from_state(
    spec: ViTSpec, depth: int, state: dict[str, torch.Tensor], drop_path_rate: float = 0.0
) -> ViT:
    """A ``ViT`` that takes ``state``'s tensors as its parameters (strict key match), built on the
    meta device so no random init is computed only to be overwritten."""
    with torch.device("meta"):
        model = ViT(spec, depth, drop_path_rate=drop_path_rate)
    model.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model


def descendant_shapes(spec: ViTSpec, depth: int) -> dict[str, tuple[int, ...]]:
    shapes = dict(shared_param_shapes(spec))
    for i in range(depth):
        shapes |= {f"blocks.{i}.{k}": v for k, v in block_param_shapes(spec).items()}
    return shapes


def save_descendant(
    model: ViT, path: str | os.PathLike[str], learngene_sha256: str = "",
    provenance: dict[str, Any] | None = None, data: DataCard | None = None,
) -> None:
    """Save a plain ViT with timm key names and our metadata (DESIGN.md §4); ``data``: its class
    names and preprocessing (``descendant_card`` reads them back)."""
    import json

    meta = {
        "spec": model.spec.to_json(),
        "depth": str(model.depth),
        "learngene_sha256": learngene_sha256,
        "provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    if data is not None:
        meta[META_KEY] = data.to_json()
    state = dict(model.state_dict())
    check_float32("descendant", state, hint="cast the model with .float() before saving")
    check_finite("descendant", state, hint="the model diverged or was corrupted; not saved")
    write_tensor_file(path, state, DESCENDANT_FORMAT, meta)


def load_descendant(path: str | os.PathLike[str]) -> tuple[ViT, dict[str, str]]:
    """Load a descendant saved by ``save_descendant``; returns the model and its metadata."""
    tensors, meta = read_tensor_file(path, DESCENDANT_FORMAT, _DESCENDANT_META, frozenset({META_KEY}))
    try:
        card_from_metadata(meta, path)  # an invalid card fails here, not later in an export
        spec = ViTSpec.from_json(meta["spec"])
        depth = check_depth(int(meta["depth"]))
    except (SpecError, ValueError) as e:
        raise FormatError(f"{path} has invalid metadata: {e}") from None
    check_tensors(path, tensors, descendant_shapes(spec, depth))
    check_float32(path, tensors, hint="descendant files are float32; re-save it with the model cast by .float()")
    check_finite(path, tensors)
    return vit_from_state(spec, depth, tensors), meta


def descendant_card(meta: dict[str, str]) -> DataCard | None:
    """The class names and preprocessing in a descendant's metadata (``load_descendant``'s second
    value); None for files written without them."""
    return card_from_metadata(meta, "descendant")
