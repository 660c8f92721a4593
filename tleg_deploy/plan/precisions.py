"""The precisions, defined once: what each is called, what a weight costs in it, which ONNX file
carries it on each runtime, how that file is validated, and how TensorRT builds it.

Two vocabularies meet here. A *precision* (``fp32``, ``fp16``, ``int8``) is what a device profile
measures, the solver picks and the CLI accepts. An *ONNX kind* is one exported file: ``int8``
(ONNX Runtime's dynamic quantization) and ``int8-qdq`` (static Q/DQ pairs, the only int8 TensorRT
reads) are two files of one precision. The manifest's ``precision`` of an ONNX artifact is its kind.

TensorRT 10.x builds *weakly typed* networks from the fp32 file (fp16) with builder flags; 11.x
removed those flags and takes the precision from the file itself (NVIDIA, "Migrating from TensorRT
10.x to 11.x"). So a precision names its TensorRT source file per major version. Stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OnnxKind:
    """One exported ONNX file variant and how ``validate_onnx`` checks it against PyTorch."""

    name: str               # fp32 | fp16 | int8 | int8-qdq: the manifest's "precision" of the file
    precision: str          # the precision it computes in
    export_format: str      # the export_family format that writes it
    file_name: str          # its name inside a member directory
    tolerance: float        # max abs logit difference on random inputs (fp16: relative to the logit scale)
    min_agreement: float    # top-1 agreement with fp32 PyTorch on real images, where images are given
    needs_images: bool      # int8: the logits move too much for a tolerance; only agreement means anything
    relative: bool = False  # the tolerance is relative to max |logit| (fp16's error scales with the logits)


@dataclass(frozen=True)
class Precision:
    name: str
    bytes_per_param: float       # exported weights (int8 keeps biases and norms wider: a lower bound)
    onnxruntime_kind: str        # the ONNX file ONNX Runtime runs at this precision
    tensorrt_kind_v10: str       # the ONNX file a TensorRT 10.x engine is built from ...
    tensorrt_kind_v11: str       # ... and a TensorRT 11.x (strongly typed) one
    tensorrt_flags_v10: tuple[str, ...]  # 10.x builder flags / trtexec options (int8: fp16 for unquantized layers)
    polygraphy_tolerance: str    # TensorRT vs ONNX Runtime, atol = rtol

    def tensorrt_kind(self, major: int) -> str:
        """The ONNX kind a TensorRT engine of this major version is built from."""
        return self.tensorrt_kind_v11 if major >= 11 else self.tensorrt_kind_v10

    def trtexec_flags(self, major: int) -> str:
        """``" --fp16"``-style options for trtexec (none on 11.x: the file carries the precision)."""
        return "".join(f" --{f}" for f in self.tensorrt_flags_v10) if major < 11 else ""


_KINDS = (
    OnnxKind("fp32", "fp32", "onnx", "model.onnx", 1e-4, 0.999, needs_images=False),
    OnnxKind("fp16", "fp16", "fp16", "model_fp16.onnx", 2e-2, 0.99, needs_images=False, relative=True),
    OnnxKind("int8", "int8", "int8", "model_int8.onnx", math.inf, 0.99, needs_images=True),
    OnnxKind("int8-qdq", "int8", "tensorrt", "model_int8_qdq.onnx", math.inf, 0.98, needs_images=True),
)
ONNX_KINDS: dict[str, OnnxKind] = {k.name: k for k in _KINDS}

_PRECISIONS = (  # highest first: the solver breaks ties toward the earlier one
    Precision("fp32", 4.0, "fp32", "fp32", "fp32", (), "1e-3"),
    Precision("fp16", 2.0, "fp16", "fp32", "fp16", ("fp16",), "2e-2"),
    Precision("int8", 1.0, "int8", "int8-qdq", "int8-qdq", ("int8", "fp16"), "1e-1"),
)
PRECISION: dict[str, Precision] = {p.name: p for p in _PRECISIONS}
PRECISIONS: tuple[str, ...] = tuple(PRECISION)


def export_formats(precision: str, backend: str) -> tuple[str, ...]:
    """The ``export_family`` formats that give the fp32 ONNX file plus what ``backend`` runs at
    ``precision``: the ONNX Runtime variant, or for TensorRT the engine build (``tensorrt`` writes
    the fp16 and Q/DQ files and ``build_engine.sh``). ``KeyError`` for an unknown precision."""
    p = PRECISION[precision]
    if backend == "tensorrt":
        return ("onnx",) if p.name == "fp32" else ("onnx", "tensorrt")
    fmt = ONNX_KINDS[p.onnxruntime_kind].export_format
    return ("onnx",) if fmt == "onnx" else ("onnx", fmt)


def deployed_kind(precision: str, backend: str) -> str:
    """The ONNX kind that carries ``precision`` for ``backend`` by itself: the file ONNX Runtime runs,
    or for TensorRT the one a strongly typed build reads (``int8`` -> ``int8-qdq``). ``KeyError`` for an
    unknown precision."""
    p = PRECISION[precision]
    return p.tensorrt_kind_v11 if backend == "tensorrt" else p.onnxruntime_kind
