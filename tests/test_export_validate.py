from __future__ import annotations

import json

import pytest
import torch

from tleg_deploy.errors import ExportError
from tleg_deploy.export.onnx import export_onnx
from tleg_deploy.export.validate import report_path, validate_onnx
from tleg_deploy.model.expansion import expand


def test_validate_passes_and_saves_report(tiny_lg, tmp_path):
    model = expand(tiny_lg, 2)
    path = export_onnx(model, tmp_path / "m.onnx")
    report = validate_onnx(path, model)
    assert report.passed and report.batch_sizes == [1, 3]
    assert 0 <= report.max_abs_diff["logits"] < 1e-4
    saved = json.loads(report_path(path).read_text())
    assert saved["format"] == "tleg-validation" and saved["passed"] is True
    assert saved["tolerance"]["logits"] == 1e-4


def test_validate_fails_on_wrong_model(tiny_lg, tmp_path):
    path = export_onnx(expand(tiny_lg, 2), tmp_path / "m.onnx")
    wrong = expand(tiny_lg, 2)
    with torch.no_grad():
        wrong.head.bias += 0.01  # a small but real difference
    with pytest.raises(ExportError, match="exceeds the fp32 tolerance"):
        validate_onnx(path, wrong)
    assert json.loads(report_path(path).read_text())["passed"] is False


def test_validate_fails_on_corrupt_file(tiny_lg, tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(ExportError):
        validate_onnx(path, expand(tiny_lg, 1), save=False)


def test_int8_needs_images(tiny_lg, tmp_path):
    model = expand(tiny_lg, 1)
    path = export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="real images"):
        validate_onnx(path, model, precision="int8")
