"""``MeasureConfig``: how ``profile.measure`` measures a device (backend, precisions, depths,
threads, and the timing protocol's rounds and repetitions), validated when it is made. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from tleg_deploy.errors import BackendError
from tleg_deploy.model.spec import MAX_DEPTH, check_depth
from tleg_deploy.profile.table import BACKENDS, PRECISIONS

CLOCKS = ("wall", "thread")  # what a runner's timer reads: perf_counter, or the timing thread's CPU time


@dataclass(frozen=True)
class MeasureConfig:
    """How to measure. ``round_seconds`` sets the repetitions per depth per round from a warm-up
    timing (clamped to ``min_reps..max_reps``)."""

    backend: str = "onnxruntime"
    precisions: tuple[str, ...] = ("fp32",)
    depths: tuple[int, ...] = (1, 6, 12)
    batch: int = 1
    threads: int = 1
    device: str = "cpu"
    warmup: int = 3
    rounds: int = 5
    round_seconds: float = 0.1
    min_reps: int = 3
    max_reps: int = 200
    memory: bool = True
    seed: int = 0
    clock: str = "wall"  # "thread": CPU time of the timing thread (diagnostic on a shared machine, 1 thread only)
    extra_rounds: int = 5  # at most this many more rounds while a depth's p50 is still unsettled ...
    settle_rel_se: float = 0.01  # ... i.e. its standard error across rounds exceeds this fraction of it
    retries: int = 2  # re-measure a session whose p50 points are not on a line within linear_tolerance ...
    linear_tolerance: float = 0.03  # ... (worst relative residual; needs >= 3 depths), keep the most linear
    probe: bool = True  # record the drift probe's reference (profile.drift), re-timed start/mid/end of profiling
    gemm: bool = True  # CPU: record this host's 1-thread GEMM rates (profile.gemm, about half a second)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise BackendError(f"unknown backend {self.backend!r}", hint=f"choose one of {', '.join(BACKENDS)}")
        if not self.precisions:
            raise BackendError("no precision given", hint=f"choose from {', '.join(PRECISIONS)}")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise BackendError(f"unknown precision {p!r}", hint=f"choose from {', '.join(PRECISIONS)}")
        if len(set(self.depths)) < 2:
            raise BackendError(f"need at least 2 distinct depths to fit a line, got {list(self.depths)}",
                               hint="e.g. --depths 1,6,12")
        for d in self.depths:
            check_depth(d, maximum=MAX_DEPTH)
        for name in ("batch", "threads", "rounds", "min_reps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BackendError(f"{name} must be a positive integer, got {value!r}")
        if self.retries < 0 or not 0 < self.linear_tolerance < 1:
            raise BackendError("retries must be >= 0 and linear_tolerance in (0, 1)")
        if self.warmup < 0 or self.extra_rounds < 0 or self.max_reps < self.min_reps or not self.round_seconds > 0:
            raise BackendError("warmup and extra_rounds must be >= 0, max_reps >= min_reps and round_seconds > 0")
        if self.device not in ("cpu", "cuda"):
            raise BackendError(f"unknown device {self.device!r}", hint="use cpu or cuda")
        if self.clock not in CLOCKS:
            raise BackendError(f"unknown clock {self.clock!r}", hint=f"choose one of {', '.join(CLOCKS)}")
        if self.clock == "thread" and (self.threads != 1 or self.device != "cpu"):
            raise BackendError("clock='thread' measures the calling thread only", hint="use it with 1 thread on CPU")
        if self.backend == "tensorrt" and self.device != "cuda":
            raise BackendError("the tensorrt backend runs on a GPU", hint="use --backend onnxruntime or torch on CPU")
