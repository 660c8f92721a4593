"""Peak-memory probe, run as ``python -m tleg_deploy.profile._probe '<json>'`` in a fresh process
per point so points don't pollute each other (allocator caches, arenas, earlier models).

CPU: peak resident set above this interpreter's baseline once the runtime library is imported
(Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``).
CUDA: device memory taken after the CUDA context exists (drop in free memory, or torch's peak
allocation if larger). Prints one JSON line ``{"peak_mb": ...}``. Imports only what the backend needs:
the ONNX Runtime probe never imports torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


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

    from tleg_deploy.model.spec import ViTSpec

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
