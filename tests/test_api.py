"""The public Python API works however it is imported: importing any submodule, in any order, must
not replace a public name (``tleg_deploy.expand``) with a module of the same name."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, pkgutil, sys, types
order = json.loads(sys.argv[1])
import tleg_deploy as td
early = td.expand  # resolved before any submodule is imported
names = sorted(m.name for m in pkgutil.walk_packages(td.__path__, "tleg_deploy.")
               if not m.name.endswith("__main__"))  # __main__ runs the CLI
names = [names[i] for i in order] if order else names
for name in names:
    importlib.import_module(name)
bad = {n: type(getattr(td, n)).__name__ for n in td.__all__ if isinstance(getattr(td, n), types.ModuleType)}
from tleg_deploy import Learngene, ViTSpec, expand, extract_learngene
spec = ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=3)
model = td.expand(Learngene.init(spec, aux_depth=2), 2)
print(json.dumps({"modules": len(names), "bad": bad, "same": early is td.expand is expand,
                  "depth": model.depth, "extract": callable(extract_learngene)}))
"""


def _module_count() -> int:
    import pkgutil

    import tleg_deploy

    return sum(1 for m in pkgutil.walk_packages(tleg_deploy.__path__, "tleg_deploy.")
               if not m.name.endswith("__main__"))


@pytest.mark.parametrize("seed", [None, 0])
def test_public_names_survive_importing_every_submodule(seed: int | None) -> None:
    n = _module_count()
    order: list[int] = []
    if seed is not None:
        order = list(range(n))
        random.Random(seed).shuffle(order)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(order)], capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["modules"] == n > 40
    assert result["bad"] == {}, f"public names shadowed by submodules: {result['bad']}"
    assert result["same"] and result["depth"] == 2 and result["extract"]


def test_all_lists_only_resolvable_public_names() -> None:
    import tleg_deploy

    for name in tleg_deploy.__all__:
        assert getattr(tleg_deploy, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tleg_deploy.nope  # noqa: B018
