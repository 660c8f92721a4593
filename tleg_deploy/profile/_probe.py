"""Peak-memory probe, run as ``python -m tleg_deploy.profile._probe '<json>'`` in a fresh process
per point so points don't pollute each other (allocator caches, arenas, earlier models).

CPU: peak resident set above this interpreter's baseline once the runtime library is imported
(Linux: ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; elsewhere ``ru_maxrss``).
CUDA: ``torch.cuda.max_memory_allocated`` (torch, TensorRT buffers) or the device memory in use
(ONNX Runtime). Prints one JSON line ``{"peak_mb": ...}``. Imports only what the backend needs:
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


def probe(cfg: dict[str, Any]) -> float:
    backend, device, runs = cfg["backend"], cfg["device"], 3
    if backend == "onnxruntime":
        import numpy as np
        import onnxruntime as ort

        from tleg_deploy.profile.measure import ort_session

        spec = cfg["spec"]
        x = np.random.default_rng(0).standard_normal(
            (cfg["batch"], spec["in_chans"], spec["img_size"], spec["img_size"]), dtype=np.float32)
        if device == "cpu":
            meter = _CpuPeak()
            sess = ort_session(cfg["artifact"], threads=cfg["threads"], device=device, ort=ort)
            for _ in range(runs):
                sess.run(None, {"pixel_values": x})
            return meter.peak_mb()
        sess = ort_session(cfg["artifact"], threads=cfg["threads"], device=device, ort=ort)
        for _ in range(runs):
            sess.run(None, {"pixel_values": x})
        return _gpu_used_mb()
    import torch

    from tleg_deploy.profile.measure import torch_runner_model

    torch.set_num_threads(cfg["threads"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        meter = _CpuPeak()
    from tleg_deploy.config import ViTSpec

    spec = ViTSpec.from_dict(cfg["spec"])
    if backend == "torch":
        model, x = torch_runner_model(spec, cfg["depth"], cfg["precision"], cfg["batch"], device)
        with torch.inference_mode():
            for _ in range(runs):
                model(x)
    else:  # tensorrt
        from tleg_deploy.profile.measure import TensorRTRunner

        runner = TensorRTRunner(Path(cfg["artifact"]), spec, cfg["batch"])
        for _ in range(runs):
            runner()
    if device == "cuda":
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0) / 1e6
    return meter.peak_mb()


def _gpu_used_mb() -> float:
    import subprocess

    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=False).stdout
    import os

    for line in out.splitlines():
        pid, used = (s.strip() for s in line.split(","))
        if pid == str(os.getpid()):
            return float(used) * 1.048576  # MiB -> MB
    return 0.0


if __name__ == "__main__":
    print(json.dumps({"peak_mb": probe(json.loads(sys.argv[1]))}))
