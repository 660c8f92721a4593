"""The one precision vocabulary and the places that read it."""

from __future__ import annotations

import pytest

from tleg_deploy.export import tensorrt, validate
from tleg_deploy.plan import costs
from tleg_deploy.plan.precisions import ONNX_KINDS, PRECISION, PRECISIONS, deployed_kind, export_formats
from tleg_deploy.profile import table


def test_vocabulary_is_consistent() -> None:
    assert PRECISIONS == ("fp32", "fp16", "int8")  # highest first: the solver's tie-break order
    for p in PRECISION.values():
        for kind in (p.onnxruntime_kind, p.tensorrt_kind(11)):  # the file carries the precision
            assert ONNX_KINDS[kind].precision == p.name
        v10 = ONNX_KINDS[p.tensorrt_kind(10)].precision  # 10.x: the file's, or fp32 lowered by a flag
        assert v10 == p.name or (v10 == "fp32" and p.name in p.tensorrt_flags_v10)
        assert p.trtexec_flags(11) == ""  # TensorRT 11 removed the precision flags
    assert {k.precision for k in ONNX_KINDS.values()} == set(PRECISIONS)
    assert len({k.file_name for k in ONNX_KINDS.values()}) == len(ONNX_KINDS)
    assert PRECISION["int8"].trtexec_flags(10) == " --int8 --fp16"


def test_readers_use_it() -> None:
    assert table.PRECISIONS == PRECISIONS and tensorrt.TRT_PRECISIONS == PRECISIONS
    assert validate.PRECISIONS == tuple(ONNX_KINDS) == ("fp32", "fp16", "int8", "int8-qdq")
    spec = costs.ViTSpec.preset("digits")
    assert [costs.artifact_bytes(spec, 2, p) for p in PRECISIONS] == [
        round(costs.params(spec, 2) * b) for b in (4, 2, 1)]


@pytest.mark.parametrize(("precision", "backend", "formats"), [
    ("fp32", "onnxruntime", ("onnx",)), ("fp16", "onnxruntime", ("onnx", "fp16")),
    ("int8", "onnxruntime", ("onnx", "int8")), ("fp32", "tensorrt", ("onnx",)),
    ("fp16", "tensorrt", ("onnx", "tensorrt")), ("int8", "tensorrt", ("onnx", "tensorrt")),
])
def test_export_formats(precision: str, backend: str, formats: tuple[str, ...]) -> None:
    assert export_formats(precision, backend) == formats


@pytest.mark.parametrize(("precision", "backend", "kind"), [
    ("fp32", "onnxruntime", "fp32"), ("fp16", "onnxruntime", "fp16"), ("int8", "onnxruntime", "int8"),
    ("fp32", "tensorrt", "fp32"), ("fp16", "tensorrt", "fp16"), ("int8", "tensorrt", "int8-qdq"),
])
def test_deployed_kind(precision: str, backend: str, kind: str) -> None:
    assert deployed_kind(precision, backend) == kind
    assert ONNX_KINDS[kind].precision == precision
