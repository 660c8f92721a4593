from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from tleg_deploy.errors import BackendError, ExportError
from tleg_deploy.export.tensorrt import BatchRange, build_script, trtexec_commands, write_build_script
from tleg_deploy.model.spec import ViTSpec

FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8-qdq": "model_int8_qdq.onnx"}


def _flags(cmd: str) -> set[str]:
    return {tok.split("=")[0] for tok in shlex.split(cmd)[1:]}


def test_trtexec_flags_per_version():
    spec = ViTSpec.preset("deit-tiny")
    cmds = trtexec_commands(FILES, spec, batch=BatchRange(1, 4, 16), timing_cache="../timing.cache")
    for precision, per_version in cmds.items():
        for major, cmd in per_version.items():
            assert cmd.startswith("trtexec ")
            assert "--minShapes=pixel_values:1x3x224x224" in cmd
            assert "--optShapes=pixel_values:4x3x224x224" in cmd
            assert "--maxShapes=pixel_values:16x3x224x224" in cmd
            assert "--timingCacheFile=../timing.cache" in cmd
            assert f"--saveEngine=model_{precision}.engine" in cmd
            if major >= 11:  # strongly typed only: the precision flags were removed in 11.x
                assert not _flags(cmd) & {"--fp16", "--int8", "--best", "--bf16"}, cmd
    assert "--fp16" in _flags(cmds["fp16"][10]) and "--onnx" in _flags(cmds["fp16"][10])
    assert "--onnx=model.onnx" in cmds["fp16"][10] and "--onnx=model_fp16.onnx" in cmds["fp16"][11]
    assert {"--int8", "--fp16"} <= _flags(cmds["int8"][10]) and "model_int8_qdq.onnx" in cmds["int8"][10]
    assert "model_int8_qdq.onnx" in cmds["int8"][11]
    assert "--fp16" not in _flags(cmds["fp32"][10])


def test_build_script_text_and_syntax(tmp_path):
    spec = ViTSpec.preset("digits")
    path = write_build_script(tmp_path, FILES, spec, batch=BatchRange(1, 8, 32))
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash") and os.access(path, os.X_OK)
    assert 'if [ "${TRT_MAJOR}" -ge 11 ]' in text
    assert text.count("trtexec --onnx=") == 6  # 3 precisions x (10.x, 11.x)
    assert "polygraphy run model.onnx --trt --onnxrt" in text
    assert "--trt-min-shapes pixel_values:[1,1,8,8]" in text and "--trt-max-shapes pixel_values:[32,1,8,8]" in text
    assert "polygraphy run model_fp16.onnx --trt --onnxrt --trt" in text  # fp16 ONNX: no extra flag
    subprocess.run(["bash", "-n", str(path)], check=True)  # valid shell
    # Without the fp16 / qdq files the script only builds what exists.
    text32 = build_script({"fp32": "m.onnx"}, spec)
    builds = [line.strip() for line in text32.splitlines() if line.strip().startswith("trtexec")]
    assert len(builds) == 3 and not any("int8" in b for b in builds)  # fp32 (10.x, 11.x) and fp16 (10.x)
    assert sum("--fp16" in b for b in builds) == 1


def test_batch_range_is_checked():
    with pytest.raises(ExportError):
        BatchRange(4, 2, 8)


def test_missing_tensorrt_is_a_backend_error(tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from tleg_deploy.export.tensorrt import build_tensorrt_engine

        with pytest.raises(BackendError, match="tensorrt"):
            build_tensorrt_engine(tmp_path / "m.onnx", tmp_path / "m.engine", spec=ViTSpec.preset("digits"))
    else:
        pytest.skip("tensorrt is installed")


@pytest.mark.tensorrt
def test_build_engine_with_tensorrt(tiny_lg, tmp_path):
    pytest.importorskip("tensorrt")
    from tleg_deploy.export.onnx import export_onnx
    from tleg_deploy.export.tensorrt import build_tensorrt_engine
    from tleg_deploy.model.expansion import expand

    onnx_path = export_onnx(expand(tiny_lg, 2), tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    engine = build_tensorrt_engine(onnx_path, tmp_path / "m.engine", spec=tiny_lg.spec,
                                   batch=BatchRange(1, 2, 4), timing_cache=cache)
    assert engine.stat().st_size > 0 and cache.stat().st_size > 0
