"""Runners for ``profile.measure``: whether a backend can run here (``require_backend``: what to
install when it cannot), build the model of a depth, export the artifact a backend runs (ONNX for
ONNX Runtime, an engine for TensorRT), and time one inference per call in ms (``make_runner``):

- ``onnxruntime``: the model exported with ``tleg_deploy.export.onnx.export_onnx`` (INT8 through
  ``tleg_deploy.export.quantize.quantize_int8``); CPU execution provider, or CUDA / TensorRT
  providers with ``device="cuda"`` when installed. Thread spinning is off (``session.intra_op.
  allow_spinning=0`` and inter-op) so a spinning pool cannot steal the core being timed.
- ``torch``: eager ``ViT``; CPU timed with ``perf_counter``, CUDA with CUDA events after a sync.
- ``tensorrt``: an engine built from the ONNX file, timed with CUDA events; skipped with a clear
  error when the package or a GPU is absent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tleg_deploy.errors import BackendError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile.config import MeasureConfig
from tleg_deploy.profile.table import BACKENDS
from tleg_deploy.profile.timing import Runner

_CLOCK_NS = {"wall": time.perf_counter_ns, "thread": time.thread_time_ns}  # keys: config.CLOCKS

INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA / TensorRT providers)",
    "torch": "pip install torch",
    "tensorrt": "pip install 'tleg-deploy[tensorrt]' on a machine with an NVIDIA GPU and driver",
}


def require_backend(backend: str, device: str = "cpu") -> None:
    """Raise ``BackendError`` saying what to install when ``backend`` cannot run here."""
    import importlib.util

    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    if importlib.util.find_spec(backend) is None:
        raise BackendError(f"the {backend} package is not installed", hint=INSTALL_HINTS[backend])
    if device == "cuda" or backend == "tensorrt":
        import torch

        if not torch.cuda.is_available():
            raise BackendError(f"{backend} on cuda needs an NVIDIA GPU, and none is visible",
                               hint="run on the GPU machine, or use --backend onnxruntime for this CPU")
    if backend == "onnxruntime" and device == "cuda":
        import onnxruntime as ort

        if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()):
            raise BackendError("onnxruntime has no CUDA execution provider here", hint=INSTALL_HINTS["onnxruntime"])


def build_model(spec: ViTSpec, depth: int, learngene: Any = None) -> Any:
    """The depth-``depth`` ViT to time: the learngene's expansion when it fits the spec, else a
    seeded random init (latency does not depend on the weights' values)."""
    import torch

    from tleg_deploy.model.vit import ViT, init_vit_

    if learngene is not None and learngene.spec == spec:
        from tleg_deploy.model.expansion import expand

        return expand(learngene, depth).eval()
    return init_vit_(ViT(spec, depth), torch.Generator().manual_seed(depth)).eval()


def ort_session(path: str | os.PathLike[str] | bytes, *, threads: int, device: str, ort: Any = None) -> Any:
    """An ONNX Runtime session with our timing protocol's options (``path``: a file, or a model's bytes)."""
    if ort is None:
        import onnxruntime

        ort = onnxruntime
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        have = ort.get_available_providers()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have] + providers
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), sess_options=so, providers=providers)


def export_artifact(model: Any, precision: str, backend: str, workdir: Path, batch: int = 1) -> Path:
    """The file a backend times: an ONNX file in ``precision`` (ONNX Runtime), or an engine built
    with ``tleg_deploy.export.tensorrt.build_tensorrt_engine`` (TensorRT). The fp32 ONNX graph is built
    from the process's shared depth template (``export.template.template_onnx``): the graph a family
    export delivers, for the price of one exporter trace per spec."""
    from tleg_deploy.export.template import template_onnx

    stem = workdir / f"depth{model.depth}"
    path = template_onnx(model, stem.with_suffix(".onnx"))
    if backend == "tensorrt":
        return _tensorrt_engine(model, path, precision, stem, batch)
    if precision == "fp32":
        return path
    from tleg_deploy.export import quantize

    if precision == "int8":
        return Path(quantize.quantize_int8(path, stem.with_suffix(".int8.onnx")))
    return Path(quantize.convert_fp16(path, stem.with_suffix(".fp16.onnx")))


def _tensorrt_engine(model: Any, fp32_onnx: Path, precision: str, stem: Path, batch: int) -> Path:
    import torch

    from tleg_deploy.export import quantize
    from tleg_deploy.export.tensorrt import BatchRange, build_tensorrt_engine, tensorrt_major

    source = fp32_onnx
    if precision == "int8":
        # Static Q/DQ; random calibration images are enough for timing (scales don't change speed).
        spec = model.spec
        images = torch.randn(8, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
        source = Path(quantize.quantize_int8(fp32_onnx, stem.with_suffix(".qdq.onnx"), mode="qdq",
                                             calibration=images))
    elif precision == "fp16" and tensorrt_major() >= 11:
        source = Path(quantize.convert_fp16(fp32_onnx, stem.with_suffix(".fp16.onnx")))
    return build_tensorrt_engine(source, stem.with_suffix(f".{precision}.engine"), spec=model.spec,
                                 precision=precision, batch=BatchRange(batch, batch, batch),
                                 timing_cache=stem.parent / "timing.cache")


class OrtRunner:
    def __init__(self, path: Path, spec: ViTSpec, batch: int, threads: int, device: str, clock: str = "wall") -> None:
        import numpy as np

        self.clock = _CLOCK_NS[clock]
        self.session = ort_session(path, threads=threads, device=device)
        self.feed = {"pixel_values": np.random.default_rng(0).standard_normal(
            (batch, spec.in_chans, spec.img_size, spec.img_size), dtype=np.float32)}

    def __call__(self) -> float:
        t0 = self.clock()
        self.session.run(None, self.feed)
        return (self.clock() - t0) / 1e6


def torch_runner_model(spec: ViTSpec, depth: int, precision: str, batch: int, device: str) -> tuple[Any, Any]:
    """The model and input the torch backend times (fp16 on CUDA only, int8 = dynamic quantization on CPU)."""
    import torch

    model = build_model(spec, depth)
    x = torch.randn(batch, spec.in_chans, spec.img_size, spec.img_size, generator=torch.Generator().manual_seed(0))
    if precision == "int8":
        if device != "cpu":
            raise BackendError("torch int8 (dynamic quantization) runs on CPU only", hint="use --device cpu")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    elif precision == "fp16":
        if device != "cuda":
            raise BackendError("torch fp16 is measured on CUDA only", hint="use fp32 or int8 on CPU")
        model, x = model.half(), x.half()
    return model.to(device), x.to(device)


class TorchRunner:
    def __init__(self, model: Any, x: Any, device: str, clock: str = "wall") -> None:
        import torch

        self.model, self.x, self.cuda = model, x, device == "cuda"
        self.clock = _CLOCK_NS[clock]
        self.torch = torch

    def __call__(self) -> float:
        torch = self.torch
        with torch.inference_mode():
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.model(self.x)
                end.record()
                end.synchronize()
                return float(start.elapsed_time(end))
            t0 = self.clock()
            self.model(self.x)
            return (self.clock() - t0) / 1e6


class TensorRTRunner:
    """A serialized TensorRT engine, timed with CUDA events on its own stream."""

    def __init__(self, engine_path: Path, spec: ViTSpec, batch: int) -> None:
        import tensorrt as trt
        import torch

        logger = trt.Logger(trt.Logger.ERROR)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not load the engine {Path(engine_path).name}")
        self.context = self.engine.create_execution_context()
        shape = (batch, spec.in_chans, spec.img_size, spec.img_size)
        self.context.set_input_shape("pixel_values", shape)
        self.x = torch.randn(shape, device="cuda")
        self.y = torch.empty((batch, spec.num_classes), device="cuda")
        self.context.set_tensor_address("pixel_values", self.x.data_ptr())
        self.context.set_tensor_address("logits", self.y.data_ptr())
        self.stream = torch.cuda.Stream()
        self.torch = torch

    def __call__(self) -> float:
        torch = self.torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        self.context.execute_async_v3(self.stream.cuda_stream)
        end.record(self.stream)
        end.synchronize()
        return float(start.elapsed_time(end))


def make_runner(cfg: MeasureConfig, spec: ViTSpec, depth: int, precision: str, workdir: Path,
                learngene: Any = None) -> tuple[Runner, str | None]:
    """The runner for one point, and the artifact the memory probe loads (``None`` for torch)."""
    if cfg.backend == "torch":
        model, x = torch_runner_model(spec, depth, precision, cfg.batch, cfg.device)
        return TorchRunner(model, x, cfg.device, cfg.clock), None
    model = build_model(spec, depth, learngene)
    path = export_artifact(model, precision, cfg.backend, workdir, cfg.batch)
    return runner_for_file(cfg, spec, path), str(path)


def runner_for_file(cfg: MeasureConfig, spec: ViTSpec, path: Path) -> Runner:
    """The runner of an exported file: an ONNX file (ONNX Runtime) or an engine (TensorRT)."""
    if cfg.backend == "onnxruntime":
        return OrtRunner(path, spec, cfg.batch, cfg.threads, cfg.device, cfg.clock)
    return TensorRTRunner(path, spec, cfg.batch)
