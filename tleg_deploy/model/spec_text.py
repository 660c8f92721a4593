"""Specs as users type them: ``parse_spec("digits,img_size=32,in_chans=3")`` and back (``spec_arg``).

One grammar for every command that takes ``--spec`` (and for the measurement hints profiles print):
a comma list of items, each

* a preset name (``deit-tiny``, ``deit-small``, ``deit-base``, ``digits``),
* a spec ``.json`` file (a ``ViTSpec`` object, or any JSON object holding one under ``"spec"``, such as a
  fit's ``plan.json``), or
* ``key=value``, a ``ViTSpec`` field, overriding the preset or file before it.

``key=value`` items with no preset or file before them start from nothing but the dataclass defaults
and ``mlp_ratio=4.0`` (DeiT's), so they must name every other field. A second preset or file starts a
second spec: ``parse_specs("deit-tiny,deit-small")`` is two, ``parse_spec`` accepts exactly one.

``infer_spec`` is the rule used when data is given without a spec (``train-teacher --data folder:…``):
the data's image size, channels and class count on a preset's width, heads and MLP ratio, with the
patch size chosen so the token grid stays the preset's (``digits``: 4x4 tokens of width 64). Stdlib
only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
from pathlib import Path
from typing import Any

from tleg_deploy.errors import SpecError
from tleg_deploy.model.spec import PRESETS, ViTSpec

KEY_VALUE_DEFAULTS: dict[str, Any] = {"mlp_ratio": 4.0}
"""What ``key=value`` items start from when no preset or file comes first (besides field defaults)."""

INFER_BASE = "digits"
"""The preset whose width, heads and token grid ``infer_spec`` keeps by default."""

_FIELDS = {f.name: f for f in dataclasses.fields(ViTSpec)}
_REQUIRED = [name for name, f in _FIELDS.items() if f.default is dataclasses.MISSING]
_FORMS = "a preset (" + ", ".join(PRESETS) + "), a spec .json file, or key=value,… (e.g. digits,img_size=32)"


def parse_spec(text: str) -> ViTSpec:
    """Exactly one spec from ``text`` (module docstring); ``SpecError`` naming the bad item otherwise."""
    specs = parse_specs(text)
    if len(specs) != 1:
        raise SpecError(f"spec {text!r} names {len(specs)} specs, one is expected",
                        hint="give one preset or file, followed by its key=value overrides")
    return specs[0]


def parse_specs(text: str) -> list[ViTSpec]:
    """One spec per preset or file in ``text``, each with the ``key=value`` items that follow it."""
    items = [t.strip() for t in str(text).split(",")]
    if not str(text).strip() or not all(items):
        raise SpecError(f"spec {text!r} has an empty item", hint=f"use {_FORMS}")
    groups: list[tuple[str | None, dict[str, Any]]] = []
    for item in items:
        if "=" in item:
            key, _, raw = item.partition("=")
            if not groups:
                groups.append((None, {}))
            overrides = groups[-1][1]
            key = key.strip()
            if key in overrides:
                raise SpecError(f"spec key {key!r} is given twice in {text!r}")
            overrides[key] = parse_value(key, raw.strip())
        else:
            groups.append((item, {}))
    return [_build(base, overrides, text) for base, overrides in groups]


def parse_value(key: str, raw: str) -> Any:
    """``raw`` as the type of ``ViTSpec`` field ``key``; ``SpecError`` naming the key if it is not one."""
    if key not in _FIELDS:
        raise SpecError(f"unknown spec key {key!r}", hint=f"keys: {', '.join(_FIELDS)}")
    kind = str(_FIELDS[key].type)
    if kind == "bool":
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if raw.lower() not in words:
            raise SpecError(f"spec key {key}={raw!r} must be true or false")
        return words[raw.lower()]
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise SpecError(f"spec key {key}={raw!r} must be an integer") from None
    try:
        value = float(raw)
    except ValueError:
        raise SpecError(f"spec key {key}={raw!r} must be a number") from None
    if not math.isfinite(value):
        raise SpecError(f"spec key {key}={raw!r} must be a finite number")
    return value


def _build(base: str | None, overrides: dict[str, Any], text: str) -> ViTSpec:
    if base is None:
        fields: dict[str, Any] = dict(KEY_VALUE_DEFAULTS)
    elif base in PRESETS:
        fields = dict(PRESETS[base])
    elif base.endswith(".json") or os.sep in base or "/" in base or Path(base).is_file():
        fields = _json_file(Path(base)).to_dict()
    else:
        raise SpecError(f"unknown spec preset {base!r}", hint=f"use {_FORMS}")
    fields.update(overrides)
    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise SpecError(f"spec {text!r} is missing {', '.join(missing)}",
                        hint="add them as key=value, or start from a preset: digits,img_size=32,in_chans=3")
    return ViTSpec(**fields)


def _json_file(path: Path) -> ViTSpec:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"no such spec file: {path}", hint=f"use {_FORMS}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecError(f"spec file {path} is not readable JSON: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("spec"), dict):
        data = data["spec"]
    try:
        return ViTSpec.from_dict(data)
    except SpecError as e:
        raise SpecError(f"spec file {path}: {e}", hint=e.hint) from None


def spec_arg(spec: ViTSpec) -> str:
    """``spec`` as a ``--spec`` argument: its preset name, or the closest preset plus the fields that
    differ (``digits,img_size=32,in_chans=3``); ``parse_spec(spec_arg(s)) == s``. Shell-safe."""
    name = spec.preset_name()
    if name is not None:
        return name
    mine = dataclasses.asdict(spec)

    def diff(preset: str) -> list[str]:
        theirs = dataclasses.asdict(ViTSpec(**PRESETS[preset]))
        return [k for k in _FIELDS if mine[k] != theirs[k]]

    best = min(PRESETS, key=lambda p: len(diff(p)))
    text = ",".join([best, *(f"{k}={_format(mine[k])}" for k in diff(best))])
    return shlex.quote(text)


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def infer_spec(img_size: int, in_chans: int, num_classes: int, base: str = INFER_BASE) -> ViTSpec:
    """The spec for data of ``img_size`` x ``img_size`` images with ``in_chans`` channels and
    ``num_classes`` classes: preset ``base``'s width, heads, MLP ratio and token grid; the patch size is
    the divisor of ``img_size`` nearest ``img_size / grid`` (the smaller on a tie), so 32 px on
    ``digits`` (a 4x4 grid) gets 8 px patches."""
    preset = ViTSpec.preset(base)
    grid = preset.img_size // preset.patch_size
    for name, value in (("img_size", img_size), ("in_chans", in_chans), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SpecError(f"cannot infer a spec: {name}={value!r} must be a positive integer")
    divisors = [p for p in range(1, img_size + 1) if img_size % p == 0]
    patch = min(divisors, key=lambda p: (abs(p - img_size / grid), p))
    return dataclasses.replace(preset, img_size=img_size, patch_size=patch, in_chans=in_chans,
                               num_classes=num_classes)
