"""Peak memory of one measured point, taken in a fresh interpreter per point so points don't
pollute each other (allocator caches, arenas, earlier models).

``peak_memory_mb`` (this process) runs ``sys.executable -m tleg_deploy.profile.memory '<json>'``
(the child, ``probe``): the same interpreter and environment, so the child imports the same package
as this process; nothing edits ``PYTHONPATH``. The child prints one JSON line ``{"peak_mb": ...}``.

CPU: peak resident set above the child's baseline once the runtime library is imported (Linux:
``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``). CUDA:
device memory taken after the CUDA context exists (drop in free memory, or torch's peak allocation
if larger). The child imports only what the backend needs: the ONNX Runtime probe never imports torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tleg_deploy.errors import BackendError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile.config import MeasureConfig

PROBE_TIMEOUT_S = 900


def peak_memory_mb(cfg: MeasureConfig, spec: ViTSpec, depth: int, precision: str, artifact: str | None) -> float:
    """Peak memory of one point in MB: ``artifact`` (the exported file; ``None`` for the torch
    backend, whose child builds the model itself) loaded and run a few times in a fresh interpreter."""
    payload = {"backend": cfg.backend, "device": cfg.device, "spec": spec.to_dict(), "depth": depth,
               "precision": precision, "batch": cfg.batch, "threads": cfg.threads, "artifact": artifact}
    try:
        proc = subprocess.run([sys.executable, "-m", "tleg_deploy.profile.memory", json.dumps(payload)],
                              capture_output=True, text=True, check=False, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BackendError(f"memory probe for depth {depth} ({precision}) ran over {PROBE_TIMEOUT_S} s",
                           hint="measure without memory (--no-memory), or a smaller spec") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BackendError(f"memory probe for depth {depth} ({precision}) failed: {tail}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


# ---------------------------------------------------------------------------------------------
# The child


def _rss_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class _CpuPeak:
    def __init__(self) -> None:
        self.proc = _rss_bytes("VmRSS") is not None and _reset_peak()
        self.base = _rss_bytes("VmRSS") if self.proc else _maxrss_bytes()

    def peak_mb(self) -> float:
        peak = _rss_bytes("VmHWM") if self.proc else _maxrss_bytes()
        return max((peak or 0) - (self.base or 0), 0) / 1e6


class _CudaPeak:
    """Device memory this process takes after its CUDA context exists: the larger of the drop in free
    device memory (TensorRT and ONNX Runtime allocate outside torch) and torch's peak allocation."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        torch.zeros(1, device="cuda")  # create the context first: it is not the model's memory
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.free, _ = torch.cuda.mem_get_info()
        self.allocated = torch.cuda.memory_allocated()

    def peak_mb(self) -> float:
        torch = self.torch
        torch.cuda.synchronize()
        free, _ = torch.cuda.mem_get_info()
        return max(self.free - free, torch.cuda.max_memory_allocated() - self.allocated, 0) / 1e6


def probe(cfg: dict[str, Any]) -> float:
    """The child side: load and run the point described by ``cfg`` (``peak_memory_mb``'s payload) a few
    times; its peak memory in MB."""
    backend, device, runs = cfg["backend"], cfg["device"], 3
    meter: _CpuPeak | _CudaPeak
    if backend == "onnxruntime":
        import numpy as np
        import onnxruntime as ort

        from tleg_deploy.profile.runners import ort_session

        meter = _CudaPeak() if device == "cuda" else _CpuPeak()  # after the imports: libraries are not the model
        spec = cfg["spec"]
        x = np.random.default_rng(0).standard_normal(
            (cfg["batch"], spec["in_chans"], spec["img_size"], spec["img_size"]), dtype=np.float32)
        sess = ort_session(cfg["artifact"], threads=cfg["threads"], device=device, ort=ort)
        for _ in range(runs):
            sess.run(None, {"pixel_values": x})
        return meter.peak_mb()
    import torch

    torch.set_num_threads(cfg["threads"])
    spec = ViTSpec.from_dict(cfg["spec"])
    if backend == "torch":
        from tleg_deploy.profile.runners import torch_runner_model

        meter = _CudaPeak() if device == "cuda" else _CpuPeak()
        model, x = torch_runner_model(spec, cfg["depth"], cfg["precision"], cfg["batch"], device)
        with torch.inference_mode():
            for _ in range(runs):
                model(x)
    else:  # tensorrt
        import tensorrt  # noqa: F401  (imported before the baseline)

        from tleg_deploy.profile.runners import TensorRTRunner

        meter = _CudaPeak()
        runner = TensorRTRunner(Path(cfg["artifact"]), spec, cfg["batch"])
        for _ in range(runs):
            runner()
    return meter.peak_mb()


if __name__ == "__main__":
    print(json.dumps({"peak_mb": probe(json.loads(sys.argv[1]))}))
