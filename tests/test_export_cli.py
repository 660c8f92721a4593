from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.export.manifest import LOCK_NAME
from tleg_deploy.model.expansion import expand, save_descendant
from tleg_deploy.model.learngene import Learngene


@pytest.fixture
def lg_file(tiny_lg, tmp_path):
    path = tmp_path / "lg.safetensors"
    tiny_lg.save(path)
    return path


def _run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _files(path):
    """Files under ``path``; the export lock file (present, unlocked, after any export) is left out."""
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []
    return [f for f in files if f != LOCK_NAME]


def test_export_json_and_weights(tiny_lg, lg_file, tmp_path):
    out = tmp_path / "out"
    code, stdout, _ = _run("export", "--learngene", lg_file, "--depth", 2, "-o", out, "--json", "--measure")
    assert code == 0, stdout
    manifest = json.loads(stdout)
    (art,) = manifest["artifacts"]
    assert art["depth"] == 2 and art["file"] == "depth_02/model.onnx" and art["parity"]["max_abs_diff"] < 1e-4
    assert art["latency"]["measured"]["p50_ms"] > 0
    # Fine-tuned weights of the same spec replace the expansion (a different source: redone, not skipped).
    model = expand(tiny_lg, 2)
    for p in model.parameters():
        p.data.mul_(1.01)
    weights = tmp_path / "ft.safetensors"
    save_descendant(model, weights, tiny_lg.sha256())
    code, stdout, _ = _run("export", "-l", lg_file, "-d", 2, "--weights", weights, "-o", out, "--json")
    assert code == 0
    new = json.loads(stdout)
    assert new["members"]["2"]["source"].startswith("weights:")
    assert new["artifacts"][0]["sha256"] != art["sha256"]


def test_export_family_text_and_depth_syntax(lg_file, tmp_path):
    out = tmp_path / "fam"
    code, stdout, _ = _run("export-family", "-l", lg_file, "--depths", "1-5:2", "-o", out)
    assert code == 0
    assert "learngene" in stdout and "manifest" in stdout
    assert {p for p in _files(out) if p.endswith(".onnx")} == {f"depth_0{d}/model.onnx" for d in (1, 3, 5)}


@pytest.mark.parametrize("args, message", [
    (["--depth", 0], "depth 0 is outside"),
    (["--depth", 5000], "depth 5000 is outside"),
    (["--depth", 2, "--format", "onnx,int4"], "unknown format 'int4'"),
])
def test_export_bad_input(lg_file, tmp_path, args, message):
    out = tmp_path / "out"
    code, stdout, stderr = _run("export", "-l", lg_file, "-o", out, *args)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_weights_of_another_spec(lg_file, tmp_path):
    from tleg_deploy.model.spec import ViTSpec

    other = Learngene.init(ViTSpec(img_size=8, patch_size=4, in_chans=3, embed_dim=24, num_heads=2, mlp_ratio=2.0,
                                   num_classes=5), aux_depth=2)
    weights = tmp_path / "w.safetensors"
    save_descendant(expand(other, 2), weights)
    out = tmp_path / "out"
    code, _, stderr = _run("export", "-l", lg_file, "-d", 2, "--weights", weights, "-o", out)
    assert code == 2 and "spec" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()
    code, _, stderr = _run("export", "-l", lg_file, "-d", 3, "--weights", tmp_path / "w.safetensors", "-o", out)
    assert code == 2 and not out.exists()


def test_corrupted_manifest_and_unwritable_output(lg_file, tmp_path):
    out = tmp_path / "fam"
    out.mkdir()
    (out / "manifest.json").write_text("{ not json")
    code, _, stderr = _run("export-family", "-l", lg_file, "--depths", "1-2", "-o", out)
    assert code == 2 and "manifest.json is corrupted" in stderr and len(stderr.strip().splitlines()) == 1
    assert _files(out) == ["manifest.json"]
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, stderr = _run("export-family", "-l", lg_file, "--depths", "1", "-o", blocker / "sub")
    assert code != 0 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_failed_validation_leaves_nothing(tiny_lg, tmp_path):
    # Head weights beyond fp16's range: the fp16 variant computes inf, its validation fails, and the
    # export ends with a one-line error and no directory left behind.
    tiny_lg.shared["head.weight"] = tiny_lg.shared["head.weight"] * 1e7
    lg_file = tmp_path / "big.safetensors"
    tiny_lg.save(lg_file)
    out = tmp_path / "out"
    code, _, stderr = _run("export", "-l", lg_file, "-d", 2, "-f", "onnx,fp16", "-o", out)
    assert code == 2 and "failed validation" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()
