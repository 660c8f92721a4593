"""Bundled files: the demo learngene (``--learngene demo``) and the shipped device profiles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tleg_deploy.learngene import Learngene

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_LEARNGENE = DATA_DIR / "demo_learngene.safetensors"


def learngene_path(name_or_path: str | os.PathLike[str]) -> Path:
    """``demo`` names the bundled learngene; anything else is a path."""
    return DEMO_LEARNGENE if str(name_or_path) == "demo" else Path(name_or_path)


def load_learngene(name_or_path: str | os.PathLike[str] = "demo") -> Learngene:
    from tleg_deploy.learngene import Learngene  # torch: only once a learngene is actually loaded

    return Learngene.load(learngene_path(name_or_path))
