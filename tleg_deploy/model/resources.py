"""Bundled files: the demo learngene (``--learngene demo``) and the shipped device profiles."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from tleg_deploy.errors import FormatError, SpecError
from tleg_deploy.files.datacard import DataCard, Preprocessing
from tleg_deploy.files.fileio import safetensors_metadata
from tleg_deploy.model.spec import ViTSpec

if TYPE_CHECKING:
    from tleg_deploy.model.learngene import Learngene

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_LEARNGENE = DATA_DIR / "demo_learngene.safetensors"
# The demo learngene was trained on the bundled digits (its provenance says so): 8x8 greyscale in [0, 1]
# (an 8-bit image / 255), then (x - 0.5) / 0.5, classes "0".."9" (train.data.data_card("digits", ...)).
DEMO_CARD = DataCard(tuple(str(i) for i in range(10)), Preprocessing(8, "L", "bilinear", 1 / 255), "digits")


def learngene_path(name_or_path: str | os.PathLike[str]) -> Path:
    """``demo`` names the bundled learngene; anything else is a path."""
    return DEMO_LEARNGENE if str(name_or_path) == "demo" else Path(name_or_path)


def load_learngene(name_or_path: str | os.PathLike[str] = "demo") -> Learngene:
    from tleg_deploy.model.learngene import Learngene  # torch: only once a learngene is actually loaded

    lg = Learngene.load(learngene_path(name_or_path))
    if lg.data is None and str(name_or_path) == "demo":  # bundled before files carried their data card
        lg.data = DEMO_CARD
    return lg


def learngene_spec(name_or_path: str | os.PathLike[str]) -> ViTSpec:
    """The spec of a learngene file, read from its header without importing torch (the solver's path)."""
    path = learngene_path(name_or_path)
    try:
        meta = safetensors_metadata(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such learngene file: {path}") from None
    except ValueError as e:
        raise FormatError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != "tleg-learngene":
        raise FormatError(f"{path} has format {meta.get('format')!r}, expected 'tleg-learngene'",
                          hint="pass a learngene (tleg-deploy info FILE says what a file is)")
    try:
        return ViTSpec.from_json(meta.get("spec", ""))
    except SpecError as e:
        raise FormatError(f"{path} has an invalid spec: {e}") from None


def learngene_aux_depth(name_or_path: str | os.PathLike[str]) -> int:
    """The Aux-Net depth a learngene file was trained at, from its header (torch-free, like ``learngene_spec``)."""
    path = learngene_path(name_or_path)
    learngene_spec(path)  # the same errors for a missing or foreign file
    try:
        return int(safetensors_metadata(path)["aux_depth"])
    except (KeyError, ValueError):
        raise FormatError(f"{path} has no valid aux_depth in its header") from None
