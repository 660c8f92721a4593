"""``export_onnx``: a plain ``ViT`` to one self-contained ONNX file with our metadata.

The file has one input ``pixel_values`` (B, C, H, W) and one output ``logits`` (B, K), a dynamic
batch axis, opset ``>= 17`` (LayerNormalization is a single op from 17 on, which keeps it a
single fp32 op in the fp16 variant and lets TensorRT fuse it), and ``metadata_props`` that say what
it is: ``format``, ``schema_version``, ``spec``, ``depth``, ``learngene_sha256``, ``tool_version``.

Exporter choice, on evidence (torch 2.13.0 CPU, 1 thread, this project's 2-core shared machine;
two rounds each of ``torch.onnx.export`` alone, same model, same opset 18):

    model                 TorchScript (dynamo=False)   dynamo (default)
    digits, depth 12      0.16-0.20 s, 1046 nodes      3.8-5.4 s, 499 nodes
    deit-tiny, depth 12   0.29-0.90 s                  3.9-4.0 s
    deit-tiny, depth 1    0.03-0.04 s                  0.9-1.3 s

Both graphs give the same ONNX Runtime latency (deit-tiny depth 12, batch 1: 14.0 vs 14.6 ms
median; digits depth 12: dynamo's 499-node graph is no slower than TorchScript's 951) and the same
parity with PyTorch (~1.5e-7) once ORT's graph optimizer has folded the
TorchScript exporter's shape arithmetic. A depth family pays the exporter once either way
(``export.template.DepthTemplate`` cuts the probe graph by structure, so it works on both), yet
the dynamo probe still makes a family export several times slower, and every export without the
template an order of magnitude slower, which matters for tests and the one-depth ``export``. So
``exporter="auto"`` (the CLI's ``--exporter`` default) uses TorchScript and silences its
deprecation warnings; the dynamo exporter (with ``external_data=False`` so the file stays
self-contained) is used where TorchScript is gone from torch or when asked for with
``exporter="dynamo"``.
End to end (export + validation of deit-tiny depth 12), ``benchmarks/export_family.py`` records both
paths side by side (``deepest_direct`` vs ``deepest_dynamo`` in ``benchmarks/results/export_family.json``).
The model is exported into memory and written once, atomically, with the metadata already in.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from tleg_deploy.errors import ExportError
from tleg_deploy.files.fileio import atomic_path
from tleg_deploy.model.vit import ViT

ONNX_FORMAT = "tleg-onnx"
SCHEMA_VERSION = "1"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
EXPORTERS = ("auto", "torchscript", "dynamo")


def model_metadata(model: ViT, learngene_sha256: str = "") -> dict[str, str]:
    """The metadata props every exported file carries (``metadata`` arguments add to them)."""
    from tleg_deploy import __version__

    return {
        "format": ONNX_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "spec": model.spec.to_json(),
        "depth": str(model.depth),
        "learngene_sha256": learngene_sha256,
        "tool_version": f"tleg-deploy {__version__}",
    }


def export_onnx(
    model: ViT,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
    opset: int = 18,
    exporter: str = "auto",
) -> Path:
    """Export ``model`` (eval mode, fp32) to ``path``; returns the path.

    ``metadata`` adds to / overrides the default props (e.g. ``learngene_sha256``). Raises
    ``ExportError`` when the exporter fails or the options are invalid.
    """
    proto = export_proto(model, opset=opset, exporter=exporter)
    props = model_metadata(model) | dict(metadata or {})
    set_metadata(proto, props)
    return save_proto(proto, path)


def export_proto(model: ViT, *, opset: int = 18, exporter: str = "auto") -> Any:
    """The ``onnx.ModelProto`` of ``model`` (no metadata, nothing written)."""
    import onnx

    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old", hint=f"use opset {MIN_OPSET} or newer")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}", hint=f"choose one of {', '.join(EXPORTERS)}")
    if not isinstance(model, ViT):
        raise ExportError(f"export_onnx needs a tleg_deploy ViT, got {type(model).__name__}")
    spec = model.spec
    was_training = model.training
    model.eval()
    example = torch.zeros(2, spec.in_chans, spec.img_size, spec.img_size)
    try:
        with torch.no_grad():
            if exporter == "dynamo" or (exporter == "auto" and not _has_torchscript_exporter()):
                proto = _export_dynamo(model, example, opset)
            else:
                data = _export_torchscript(model, example, opset)
                proto = onnx.load_from_string(data)
    except ExportError:
        raise
    except Exception as e:  # the exporters raise many types; one typed error for callers
        raise ExportError(f"ONNX export of depth-{model.depth} ViT failed: {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    return proto


def set_metadata(proto: Any, props: dict[str, str]) -> None:
    """Replace ``proto``'s metadata props by ``props`` (all values strings)."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    proto.producer_name = "tleg-deploy"


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def save_proto(proto: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``proto`` as one self-contained file, atomically."""
    target = Path(path)
    data = proto.SerializeToString()
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def _has_torchscript_exporter() -> bool:
    try:
        from torch.onnx._internal import torchscript_exporter  # noqa: F401
    except ImportError:
        return False
    return True


def _export_torchscript(model: ViT, example: torch.Tensor, opset: int) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated on every call; our choice is documented.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model, (example,), buffer,  # type: ignore[arg-type]  # the TorchScript path takes file objects
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=False, do_constant_folding=True,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return buffer.getvalue()


def _export_dynamo(model: ViT, example: torch.Tensor, opset: int) -> Any:
    import logging

    batch = torch.export.Dim("batch", min=1, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            opset_version=opset, dynamo=True, external_data=False, verbose=False,
            dynamic_shapes={"x": {0: batch}},
        )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    return program.model_proto
