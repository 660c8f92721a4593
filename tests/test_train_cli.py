from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.model.expansion import load_descendant
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.train.data import load_data

runner = CliRunner()


def _accuracy(model: torch.nn.Module) -> float:
    """Top-1 on the digits test split, computed here rather than by the training code."""
    x, y = load_data("digits", model.spec, "test")
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def _ok(args: list[str]) -> dict:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.slow
def test_teacher_learngene_finetune_chain(tmp_path: Path) -> None:
    t, lg, m = tmp_path / "t.safetensors", tmp_path / "lg.safetensors", tmp_path / "m.safetensors"
    fast = ["--epochs", "1", "--batch-size", "256", "--quiet", "--json"]
    r = _ok(["train-teacher", "--depth", "2", "--width", "96", "--heads", "6", "-o", str(t), *fast])
    teacher = load_descendant(t)[0].eval()
    assert teacher.spec.embed_dim == 96
    assert r["test_acc"] == pytest.approx(_accuracy(teacher), abs=1e-6)  # what was saved is what was scored
    r = _ok(["train-learngene", "--teacher", str(t), "--aux-depth", "2", "-o", str(lg), *fast])
    learned = Learngene.load(lg)
    assert learned.provenance["trained"] is True and learned.aux_depth == 2 and r["sha256"] == learned.sha256()
    r = _ok(["finetune", "--learngene", str(lg), "--depth", "2", "--init", "weight-selection", "--teacher", str(t),
             "-o", str(m), *fast])
    assert r["init"] == "weight-selection" and (tmp_path / "m.run" / "metrics.jsonl").is_file()
    assert load_descendant(m)[1]["learngene_sha256"] == ""  # not derived from the learngene
    # --resume with a longer schedule continues after the saved epoch
    r = _ok(["finetune", "--learngene", str(lg), "--depth", "2", "--init", "weight-selection", "--teacher", str(t),
             "-o", str(m), "--resume", *fast[2:], "--epochs", "2"])
    assert r["resumed_from_epoch"] == 1
    lines = (tmp_path / "m.run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_bad_data_is_one_line_error(tmp_path: Path) -> None:
    res = runner.invoke(app, ["finetune", "--depth", "1", "--data", f"folder:{tmp_path / 'nope'}", "-o",
                              str(tmp_path / "m.safetensors"), "--quiet"])
    assert res.exit_code == 2
    assert "no such data folder" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("args, message", [
    (["finetune", "--depth", "1", "--epochs", "0"], "--epochs"),
    (["finetune", "--depth", "1", "--epochs", "abc"], "--epochs"),
    (["train-learngene", "--teacher", "missing.safetensors"], "no such file: missing.safetensors"),
    (["finetune", "--depth", "1", "--init", "weight-selection", "--teacher", "missing.safetensors"], "no such file"),
])
def test_bad_input_fails_before_writing(tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "m.safetensors"), "--quiet"])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_output_directory_is_refused_before_training(tmp_path: Path) -> None:
    res = runner.invoke(app, ["finetune", "--depth", "1", "--data", "npz:missing.npz", "-o", str(tmp_path), "--quiet"])
    assert res.exit_code == 2 and "is a directory" in res.output  # not the (later) data error
    assert list(tmp_path.iterdir()) == []


def test_help_has_examples() -> None:
    for cmd in ("train-teacher", "train-learngene", "finetune"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Example:" in res.output
