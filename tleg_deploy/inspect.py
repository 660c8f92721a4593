"""Describe learngene and descendant files (``tleg-deploy info``) and tabulate expansions."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch

from tleg_deploy.expand import DESCENDANT_FORMAT, expand, load_descendant
from tleg_deploy.learngene import FORMAT as LEARNGENE_FORMAT
from tleg_deploy.learngene import Learngene, descendant_params
from tleg_deploy.resources import learngene_path
from tleg_deploy.tensorfile import read_metadata


def describe_file(name_or_path: str) -> dict[str, Any]:
    path = learngene_path(name_or_path)
    fmt = read_metadata(path).get("format")
    if fmt == LEARNGENE_FORMAT:
        lg = Learngene.load(path)
        facts = {"file": str(path), "file_bytes": path.stat().st_size, **lg.describe()}
        depths = sorted({1, max(1, lg.aux_depth // 2), lg.aux_depth, 2 * lg.aux_depth})
        facts["params_by_depth"] = {d: descendant_params(lg.spec, d) for d in depths}
        return facts
    if fmt == DESCENDANT_FORMAT:
        model, meta = load_descendant(path)
        return {
            "file": str(path), "file_bytes": path.stat().st_size, "kind": "descendant",
            "spec": model.spec.to_dict(), "spec_preset": model.spec.preset_name(),
            "depth": model.depth, "params": sum(p.numel() for p in model.parameters()),
            "learngene_sha256": meta["learngene_sha256"],
            "provenance": json.loads(meta["provenance"]),
        }
    from tleg_deploy.errors import FormatError

    raise FormatError(f"{path} has format {fmt!r}; expected a learngene or a descendant")


def expansion_table(name_or_path: str, depths: Iterable[int], n_inputs: int = 64) -> list[dict[str, Any]]:
    """Expand to each depth; report size and how often its top-1 agrees with the Aux-Net depth."""
    lg = Learngene.load(learngene_path(name_or_path))
    g = torch.Generator().manual_seed(0)
    s = lg.spec
    x = torch.randn(n_inputs, s.in_chans, s.img_size, s.img_size, generator=g)
    with torch.inference_mode():
        reference = expand(lg, lg.aux_depth).eval()(x).argmax(-1)
        rows = []
        for depth in depths:
            model = expand(lg, depth).eval()
            params = sum(p.numel() for p in model.parameters())
            agreement = float((model(x).argmax(-1) == reference).float().mean())
            rows.append({"depth": depth, "params": params, "bytes": 4 * params, "agreement": agreement})
    return rows
