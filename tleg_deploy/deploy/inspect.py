"""Describe learngene and descendant files (``tleg-deploy info``)."""

from __future__ import annotations

import json
from typing import Any

from tleg_deploy.files.tensorfile import read_metadata
from tleg_deploy.model.expansion import DESCENDANT_FORMAT, load_descendant
from tleg_deploy.model.learngene import FORMAT as LEARNGENE_FORMAT
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.resources import learngene_path
from tleg_deploy.plan.costs import params


def describe_file(name_or_path: str) -> dict[str, Any]:
    path = learngene_path(name_or_path)
    fmt = read_metadata(path).get("format")
    if fmt == LEARNGENE_FORMAT:
        lg = Learngene.load(path)
        facts = {"file": str(path), "file_bytes": path.stat().st_size, **lg.describe()}
        depths = sorted({1, max(1, lg.aux_depth // 2), lg.aux_depth, 2 * lg.aux_depth})
        facts["params_by_depth"] = {d: params(lg.spec, d) for d in depths}
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
