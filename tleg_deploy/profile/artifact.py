"""Time one exported ONNX file on this CPU with the profiler's own protocol (``profile.timing``:
fixed intra-op threads, spinning off, warm-up, interleaved rounds, medians), so that a measured
artifact and a predicted depth are figures of the same kind. Used by ``fit`` (the measured check)
and ``export_family(measure_latency=True)``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tleg_deploy.model.spec import ViTSpec


@dataclass(frozen=True)
class Measurement:
    """Latency of one exported artifact on this machine (ONNX Runtime, CPU)."""

    depth: int
    precision: str
    p50_ms: float
    p90_ms: float
    runs: int
    threads: int
    batch: int = 1

    def at(self, percentile: str) -> float:
        return self.p90_ms if percentile == "p90" else self.p50_ms

    def to_dict(self) -> dict[str, Any]:
        import onnxruntime as ort

        return {**asdict(self), "backend": f"onnxruntime {ort.__version__} cpu"}


def measure_onnx(path: str | os.PathLike[str], spec: ViTSpec, *, depth: int, precision: str, threads: int = 1,
                 batch: int = 1, rounds: int = 7, round_seconds: float = 0.15) -> Measurement:
    from tleg_deploy.profile.config import MeasureConfig
    from tleg_deploy.profile.runners import OrtRunner
    from tleg_deploy.profile.timing import time_runners

    cfg = MeasureConfig(threads=threads, batch=batch, rounds=rounds, round_seconds=round_seconds, memory=False)
    stats = time_runners({depth: OrtRunner(Path(path), spec, batch, threads, "cpu")}, cfg)[depth]
    return Measurement(depth=depth, precision=precision, p50_ms=stats["p50"], p90_ms=stats["p90"],
                       runs=int(stats["n"]), threads=threads, batch=batch)
