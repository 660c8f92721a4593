"""INT8 and FP16 variants of an exported fp32 ONNX file.

- ``quantize_int8(..., mode="dynamic")``: ONNX Runtime dynamic quantization (int8 weights, int8
  activations quantized on the fly) of the weight MatMuls/Gemms only (``MatMulConstBOnly``): the
  attention products QKᵀ and AV stay fp32, which is where a ViT loses accuracy to int8.
  Weight scales are chosen per weight (``per_channel=None``, the default): one scale for the whole
  matrix where its output channels span similar ranges (largest channel max |w| at most
  ``SPREAD_PER_CHANNEL`` = 2× the median channel's, so the per-tensor step is at most one bit coarser
  for the median channel), one scale per output channel where some channels are much wider (the
  outlier channels of trained transformers, which a single scale would flatten), and always per
  channel for the classifier head, the last weight product, whose error moves top-1 directly.
  Why: per-channel dynamic MatMuls ran 2-7% slower in ONNX Runtime 1.32 on this machine (digits
  depth 12: 0.386 vs 0.363 ms, 0.372 ms mixed; deit-tiny: 13.19 vs 12.96 ms; interleaved 1-thread
  runs). The bound of 2 comes from the trained demo (weight spreads 1.3-2.2, the MLP's fc1 the
  widest): top-1 agreement with fp32 on the digits test split (validate_onnx, 359 images) at depths
  1/3/6/9/12 was 99.4/100/99.4/100/100% all per channel, 99.2/99.4/98.9/99.4/100% all per tensor
  (depth 6 below the 99% bar), 99.4/99.4/98.9/99.4/100% with a bound of 2.5 (fc1 per tensor) and
  99.2/99.4/99.4/99.7/100% with 2 (fc1 and the head per channel). ``per_channel=True`` or ``False``
  forces one scheme for every weight; the file's metadata says how many got which
  (``int8_weight_scales``).
  Why dynamic for the ONNX Runtime CPU target: it needs no calibration images (``export`` and the
  profiler have none unless the user gives them), and it is as fast as static QDQ within a few percent
  (``benchmarks/export_speed.py``, digits depth 12, one interleaved run on an Intel Xeon, the blocks on
  token rows so every weight product is a Gemm: dynamic per weight 0.82x our fp32 time, as one
  DynamicQuantizeMatMul per weight with the bias fused; static QDQ calibrated on digits runs as
  QuantizeLinear + QGemm with the bias fused, 0.84-0.86x per channel, 0.80x per tensor with int8
  activations and 0.77x with uint8 ones). Before the blocks ran on token rows static QDQ ran as
  QuantizeLinear + MatMulIntegerToFloat + a separate bias Add, at 0.82-1.06x against dynamic's 0.70x.
  The price of dynamic: activation scales are picked per call, so one image's logits move with its
  batch-mates (up to 0.10 there); the static ``qdq`` variant cannot (``tests/test_export_quantize.py``)
  and is the one to use where that matters.
- ``quantize_int8(..., mode="qdq", calibration=images)``: static QuantizeLinear/DequantizeLinear
  pairs from calibration images, symmetric int8 with per-channel weights — the explicit-quantization
  form TensorRT reads (it cannot read ORT's dynamic ``DynamicQuantizeLinear``/``MatMulInteger``).
- ``convert_fp16``: ONNX Runtime's ``convert_float_to_float16``: weights and activations in fp16,
  with LayerNormalization and Softmax blocked in fp32 (their inputs cast up, outputs cast down) to
  avoid overflow in the variance and the exponent; ``keep_io_types`` leaves the graph's input and
  output fp32 so callers feed the same arrays. On the trained demo expanded to depths 1/3/6/9/12,
  top-1 agreement with fp32 PyTorch on the digits test split (359 images) was 100/99.7/100/100/100%,
  the same as the hand-written converter it replaced.

Each keeps the source's metadata props and adds ``precision``. Writes are atomic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tleg_deploy.errors import BackendError, ExportError
from tleg_deploy.export.onnx import INPUT_NAME, save_proto, set_metadata

INT8_MODES = ("dynamic", "qdq")
SPREAD_PER_CHANNEL = 2.0  # a weight whose widest output channel exceeds 2x the median one gets per-channel scales
FP32_OPS = ("LayerNormalization", "Softmax")  # kept in fp32 in the fp16 variant


def quantize_int8(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    mode: str = "dynamic",
    calibration: torch.Tensor | None = None,
    per_channel: bool | None = None,
) -> Path:
    """Write an int8 variant of ``onnx_path`` to ``out_path``; returns ``out_path``. ``per_channel``: None picks
    the weight scales per weight (dynamic; per channel for static QDQ), True / False forces one scheme."""
    try:
        import onnx
        from onnxruntime import quantization as q
    except ImportError as e:
        raise BackendError("onnxruntime is not installed", hint="pip install onnxruntime") from e
    if mode not in INT8_MODES:
        raise ExportError(f"unknown int8 mode {mode!r}", hint=f"choose one of {', '.join(INT8_MODES)}")
    if mode == "qdq" and (calibration is None or len(calibration) == 0):
        raise ExportError("static (QDQ) int8 needs calibration images", hint="pass calibration=images")
    src = Path(onnx_path)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    scales: dict[str, int] = {}
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quant.") as tmp, _quiet_root_logger():
        tmp_out = Path(tmp) / "q.onnx"
        try:
            if mode == "dynamic":
                named = Path(tmp) / "named.onnx"
                groups = weight_scale_groups(onnx.load(str(src)), per_channel, save_to=named)
                if not groups:
                    raise ExportError(f"{src.name} has no MatMul or Gemm with a constant weight to quantize")
                cur = named
                for i, group in enumerate(groups):
                    nxt = Path(tmp) / f"q{i}.onnx"
                    q.quantize_dynamic(
                        cur, nxt, op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=group.nodes,
                        weight_type=q.QuantType.QInt8, per_channel=group.per_channel,
                        extra_options={"MatMulConstBOnly": True},
                    )
                    scales[group.label] = group.weights
                    cur = nxt
                tmp_out = cur
            else:
                assert calibration is not None  # checked above; for mypy
                q.quantize_static(
                    src, tmp_out, _Reader(calibration), quant_format=q.QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel is not False,
                    activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                    extra_options={
                        "ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                    },
                )
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"int8 ({mode}) quantization of {src.name} failed: {type(e).__name__}: {e}") from e
        proto = onnx.load(str(tmp_out))
    _tag(proto, src, "int8" if mode == "dynamic" else "int8-qdq",
         {"int8_weight_scales": ", ".join(f"{k} {v}" for k, v in scales.items())} if scales else {})
    return save_proto(proto, out)


def weight_scale_groups(proto: Any, per_channel: bool | None, *, save_to: Path) -> list[WeightGroup]:
    """The weight MatMul/Gemm nodes of ``proto`` grouped by the scales they get (empty groups dropped),
    after naming any unnamed node (ORT selects nodes by name); saves the named graph to ``save_to``.
    ``per_channel=None`` decides per weight (see the module doc): the last weight product (the
    classifier head, whose output is top-1) always per channel, the others by their channel spread."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    used = {n.name for n in proto.graph.node if n.name}
    weights = [(k, n) for k, n in enumerate(proto.graph.node)
               if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2 and n.input[1] in inits]
    groups = {True: WeightGroup(True), False: WeightGroup(False)}
    for pos, (k, node) in enumerate(weights):
        if not node.name:
            node.name = next(n for n in (f"{node.op_type}_q{k}_{j}" for j in range(len(used) + 1)) if n not in used)
            used.add(node.name)
        if per_channel is not None:
            channel_wise = per_channel
        elif pos == len(weights) - 1:
            channel_wise = True
        else:
            w = np.abs(numpy_helper.to_array(inits[node.input[1]]).astype(np.float32))
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
            channel_max = w.max(axis=1) if trans_b else w.reshape(-1, w.shape[-1]).max(axis=0)  # per output channel
            median = float(np.median(channel_max))
            channel_wise = not median > 0 or float(channel_max.max()) / median > SPREAD_PER_CHANNEL
        group = groups[channel_wise]
        group.weights += 1
        group.nodes.append(node.name)
        if node.op_type == "Gemm":  # ORT's quantizer first splits a Gemm into "<name>_MatMul" + Add
            group.nodes.append(f"{node.name}_MatMul")
    save_proto(proto, save_to)
    return [g for g in groups.values() if g.weights]


@dataclasses.dataclass
class WeightGroup:
    """Weight products that get the same kind of int8 weight scales: their node names (as ORT's
    quantizer will see them) and how many weights they are."""

    per_channel: bool
    nodes: list[str] = dataclasses.field(default_factory=list)
    weights: int = 0

    @property
    def label(self) -> str:
        return "per-channel" if self.per_channel else "per-tensor"


def convert_fp16(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str]) -> Path:
    """Write an fp16 variant of ``onnx_path`` (fp32 I/O, LayerNorm and Softmax in fp32) with ONNX
    Runtime's converter (``onnxruntime.transformers.float16``), which inserts the Casts around the
    blocked ops and keeps initializers that only blocked ops read in fp32."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as e:
        raise BackendError("onnxruntime is not installed", hint="pip install onnxruntime") from e
    src = Path(onnx_path)
    try:
        with _quiet_root_logger():
            proto = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True,
                                             op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS])
            # The converter appends its Casts at the end; checkers and TensorRT want sorted nodes.
            OnnxModel(proto).topological_sort()
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ExportError(f"fp16 conversion of {src.name} failed: {type(e).__name__}: {e}") from e
    _tag(proto, src, "fp16")
    return save_proto(proto, out_path)


def _tag(proto: Any, src: Path, precision: str, extra: dict[str, str] | None = None) -> None:
    from tleg_deploy.export.onnx import read_metadata

    props = read_metadata(src) | {"precision": precision} | (extra or {})
    set_metadata(proto, props)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """ORT's quantizer logs "consider pre-processing" on the root logger on every call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class _Reader:
    """ORT calibration data reader over a tensor of images, in batches of 32."""

    def __init__(self, images: torch.Tensor, batch: int = 32) -> None:
        arr = images.detach().float().numpy().astype(np.float32)
        self._batches = iter([arr[i : i + batch] for i in range(0, len(arr), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._batches, None)
        return None if x is None else {INPUT_NAME: x}
