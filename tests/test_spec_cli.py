"""Specs from the command line: the parser (presets, JSON files, key=value, overrides, errors), the
spec inferred from folder:/npz: data, data that does not match a spec, and the resize notice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.errors import DataError, SpecError
from tleg_deploy.model.spec import PRESETS, ViTSpec
from tleg_deploy.model.spec_text import infer_spec, parse_spec, parse_specs, spec_arg
from tleg_deploy.train.data import check_data, describe_data

runner = CliRunner()


# -- the parser ------------------------------------------------------------------------------------
def test_presets_key_values_and_overrides() -> None:
    assert parse_spec("deit-tiny") == ViTSpec.preset("deit-tiny")
    full = parse_spec("img_size=32,patch_size=4,in_chans=3,embed_dim=192,num_heads=3,num_classes=10")
    assert (full.img_size, full.patch_size, full.in_chans, full.mlp_ratio) == (32, 4, 3, 4.0)
    over = parse_spec("deit-tiny, img_size=32 ,fc_norm=true")
    assert over.img_size == 32 and over.embed_dim == 192 and over.num_classes == 1000 and over.fc_norm is True
    assert parse_specs("deit-tiny,deit-small") == [ViTSpec.preset("deit-tiny"), ViTSpec.preset("deit-small")]
    assert parse_specs("digits,in_chans=3,deit-tiny")[0].in_chans == 3


def test_json_file_and_plan_json(tmp_path: Path) -> None:
    spec = ViTSpec(img_size=16, patch_size=4, in_chans=3, embed_dim=32, num_heads=2, mlp_ratio=2.0, num_classes=7)
    (tmp_path / "s.json").write_text(spec.to_json())
    (tmp_path / "plan.json").write_text(json.dumps({"format": "tleg-fit", "spec": spec.to_dict()}))
    assert parse_spec(str(tmp_path / "s.json")) == spec
    assert parse_spec(f"{tmp_path / 'plan.json'},num_classes=3").num_classes == 3


@pytest.mark.parametrize(("text", "match"), [
    ("digits,img_sise=32", "unknown spec key 'img_sise'"),
    ("digits,img_size=big", "img_size='big' must be an integer"),
    ("digits,mlp_ratio=nan", "mlp_ratio='nan' must be a finite number"),
    ("digits,qkv_bias=maybe", "qkv_bias='maybe' must be true or false"),
    ("digits,img_size=32,img_size=16", "given twice"),
    ("digits,img_size=9", "not divisible by patch_size"),
    ("deit-huge", "unknown spec preset 'deit-huge'"),
    ("img_size=32,in_chans=3", "missing patch_size, embed_dim, num_heads, num_classes"),
    ("digits,,in_chans=3", "empty item"),
    ("missing.json", "no such spec file"),
])
def test_bad_specs_name_the_problem(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        parse_spec(text)


def test_one_spec_expected() -> None:
    with pytest.raises(SpecError, match="names 2 specs"):
        parse_spec("deit-tiny,deit-small")


@pytest.mark.parametrize("spec", [
    *(ViTSpec(**p) for p in PRESETS.values()),
    infer_spec(32, 3, 10),
    ViTSpec(img_size=12, patch_size=3, in_chans=2, embed_dim=30, num_heads=5, mlp_ratio=2.5, num_classes=4,
            qkv_bias=False, norm_eps=1e-5, class_token=True, fc_norm=True),
])
def test_spec_arg_round_trips(spec: ViTSpec) -> None:
    text = spec_arg(spec)
    assert " " not in text and parse_spec(text) == spec
    assert spec_arg(infer_spec(32, 3, 10)) == "digits,img_size=32,patch_size=8,in_chans=3"


def test_infer_keeps_the_token_grid() -> None:
    s = infer_spec(32, 3, 3)
    assert (s.img_size // s.patch_size, s.embed_dim, s.num_heads, s.in_chans, s.num_classes) == (4, 64, 4, 3, 3)
    assert infer_spec(28, 1, 10).patch_size == 7
    assert infer_spec(224, 3, 1000, base="deit-tiny").patch_size == 16
    with pytest.raises(SpecError, match="in_chans=0"):
        infer_spec(32, 0, 3)


# -- data ------------------------------------------------------------------------------------------
def _rgb_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            img[..., c % 3] = 255  # the class is the saturated channel: learnable in one epoch
            Image.fromarray(img).save(root / f"class_{c}" / f"{i}.png")
    return root


def test_describe_and_check_folder(tmp_path: Path) -> None:
    root = _rgb_folder(tmp_path / "imgs")
    shape = describe_data(f"folder:{root}")
    assert (shape.height, shape.width, shape.in_chans, shape.num_classes, shape.uniform) == (32, 32, 3, 3, True)
    assert check_data(f"folder:{root}", infer_spec(32, 3, 3)) == []
    with pytest.raises(DataError, match="3 channel.*in_chans=1"):
        check_data(f"folder:{root}", ViTSpec.preset("digits"))
    with pytest.raises(DataError, match="3 classes, the spec has num_classes=10"):
        check_data(f"folder:{root}", infer_spec(32, 3, 10))
    notes = check_data(f"folder:{root}", infer_spec(16, 3, 3))
    assert len(notes) == 1 and "32x32: resized to 16x16" in notes[0]


def test_describe_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 16, 16, 3), np.uint8), y=np.arange(20) % 4)
    shape = describe_data(f"npz:{tmp_path / 'd.npz'}")
    assert (shape.img_size, shape.in_chans, shape.num_classes) == (16, 3, 4)
    np.savez(tmp_path / "g.npz", x=np.zeros((20, 8, 8)), y=np.arange(20) % 2)
    assert describe_data(f"npz:{tmp_path / 'g.npz'}").in_chans == 1


# -- the CLI ---------------------------------------------------------------------------------------
FAST = ["--epochs", "1", "--depth", "1", "--batch-size", "64", "--quiet"]


def test_train_teacher_infers_the_spec_from_a_folder(tmp_path: Path) -> None:
    from tleg_deploy.model.expansion import load_descendant

    root = _rgb_folder(tmp_path / "imgs")
    res = runner.invoke(app, ["train-teacher", "--data", f"folder:{root}", "-o", str(tmp_path / "t.safetensors"),
                              *FAST])
    assert res.exit_code == 0, res.output
    assert "spec inferred from" in res.stderr and "32x32 RGB, 3 classes" in res.stderr
    assert "--spec digits,img_size=32,patch_size=8,in_chans=3,num_classes=3" in " ".join(res.stderr.split())
    assert load_descendant(tmp_path / "t.safetensors")[0].spec == infer_spec(32, 3, 3)
    # The learngene takes the teacher's spec without --spec.
    res = runner.invoke(app, ["train-learngene", "--teacher", str(tmp_path / "t.safetensors"), "--aux-depth", "1",
                              "--data", f"folder:{root}", "-o", str(tmp_path / "lg.safetensors"), "--epochs", "1",
                              "--batch-size", "64", "--quiet"])
    assert res.exit_code == 0, res.output
    from tleg_deploy.model.resources import learngene_spec

    assert learngene_spec(tmp_path / "lg.safetensors") == infer_spec(32, 3, 3)


def test_train_teacher_with_a_custom_spec_says_it_resizes(tmp_path: Path) -> None:
    root = _rgb_folder(tmp_path / "imgs")
    spec = "digits,img_size=16,patch_size=4,in_chans=3,num_classes=3"
    res = runner.invoke(app, ["train-teacher", "--data", f"folder:{root}", "--spec", spec, "-o",
                              str(tmp_path / "t.safetensors"), *FAST])
    assert res.exit_code == 0, res.output
    assert "resized to 16x16" in res.stderr and "spec inferred" not in res.stderr


@pytest.mark.parametrize(("spec", "match"), [
    ("digits", "has 3 channel(s), the spec has in_chans=1"),
    ("digits,in_chans=3", "has 3 classes, the spec has num_classes=10"),
    ("digits,img_sise=3", "unknown spec key 'img_sise'"),
])
def test_mismatch_and_bad_spec_are_one_line_errors(tmp_path: Path, spec: str, match: str) -> None:
    root = _rgb_folder(tmp_path / "imgs", per_class=6)
    out = tmp_path / "t.safetensors"
    res = runner.invoke(app, ["train-teacher", "--data", f"folder:{root}", "--spec", spec, "-o", str(out), *FAST])
    assert res.exit_code == 2, res.output
    assert match in " ".join(res.stderr.split()) and len(res.stderr.strip().splitlines()) <= 2
    assert not out.exists()


def test_help_lists_the_presets() -> None:
    for cmd in ("train-teacher", "train-learngene", "extract", "profile"):
        text = " ".join(runner.invoke(app, [cmd, "--help"]).output.split())
        assert all(name in text for name in PRESETS), cmd


def test_profile_takes_a_custom_spec(tmp_path: Path) -> None:
    """``profile --spec`` parses key=value (a bad key is a one-line error before anything is measured)."""
    res = runner.invoke(app, ["profile", "--device", "x", "--spec", "digits,in_chanz=3", "-o",
                              str(tmp_path / "p.json")])
    assert res.exit_code == 2 and "unknown spec key 'in_chanz'" in res.stderr
