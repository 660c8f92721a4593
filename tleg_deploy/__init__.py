"""tleg-deploy: deploy Vision Transformers of any depth from one learngene.

Public names are imported lazily so that ``import tleg_deploy`` stays cheap (no torch) until a
torch-backed name is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ViTSpec": "tleg_deploy.model.spec",
    "Learngene": "tleg_deploy.model.learngene",
    "AuxNet": "tleg_deploy.model.auxnet",
    "ViT": "tleg_deploy.model.vit",
    "expand": "tleg_deploy.model.expansion",
    "save_descendant": "tleg_deploy.model.expansion",
    "load_descendant": "tleg_deploy.model.expansion",
    "extract_learngene": "tleg_deploy.model.extract",
    "import_tleg_checkpoint": "tleg_deploy.model.tleg_import",
    "load_learngene": "tleg_deploy.model.resources",
    "TlegError": "tleg_deploy.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tleg_deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
