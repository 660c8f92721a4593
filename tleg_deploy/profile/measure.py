"""``profile(...)``: measure latency and peak memory of a few depths on this machine and fit the
depth cost model (``table.make_entry``) into a ``DeviceProfile``.

Backends sit behind one small interface (a *runner*: one call = one timed inference, in ms):

- ``onnxruntime``: the model exported with ``tleg_deploy.export.onnx.export_onnx`` (INT8 through
  ``tleg_deploy.export.quantize.quantize_int8``); CPU execution provider, or CUDA / TensorRT
  providers with ``device="cuda"`` when installed. Thread spinning is off (``session.intra_op.
  allow_spinning=0`` and inter-op) so a spinning pool cannot steal the core being timed.
- ``torch``: eager ``ViT``; CPU timed with ``perf_counter``, CUDA with CUDA events after a sync.
- ``tensorrt``: an engine built from the ONNX file, timed with CUDA events; skipped with a clear
  error when the package or a GPU is absent.

Protocol (same for all): fixed intra-op threads (default 1, recorded), warm-up, then several
*interleaved rounds* (each round times every depth, in a shuffled order) so slow drift of the
machine hits all depths alike, plus a few extra rounds (bounded) while a depth's p50 is still
unsettled; the statistics are p50/p90/p99/mean/std over all runs, and the standard error of
p50/p90 across rounds feeds the fit's prediction interval. Every block of a ViT costs the same,
so a session whose p50 points are off a line by more than 3% was disturbed (a neighbour's burst of
load): it is measured again, at most twice, the most linear session is kept and the others are
recorded in the entry's ``basis``. Peak memory is measured in a fresh subprocess per point
(``_probe``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tleg_deploy.errors import BackendError
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.profile import env as envmod
from tleg_deploy.profile.linefit import fit_line
from tleg_deploy.profile.runners import (
    CLOCKS,
    OrtRunner,
    TensorRTRunner,
    TorchRunner,
    build_model,
    export_artifact,
    torch_runner_model,
)
from tleg_deploy.profile.table import BACKENDS, PRECISIONS, DeviceProfile, Entry, Point, make_entry

INSTALL_HINTS = {
    "onnxruntime": "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA / TensorRT providers)",
    "torch": "pip install torch",
    "tensorrt": "pip install 'tleg-deploy[tensorrt]' on a machine with an NVIDIA GPU and driver",
}


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


class Runner(Protocol):
    """One timed inference per call, returning its latency in milliseconds."""

    def __call__(self) -> float: ...


# ---------------------------------------------------------------------------------------------
# Availability


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


def make_runner(cfg: MeasureConfig, spec: ViTSpec, depth: int, precision: str, workdir: Path,
                learngene: Any = None) -> tuple[Runner, str | None]:
    """The runner for one point, and the artifact the memory probe loads (``None`` for torch)."""
    if cfg.backend == "torch":
        model, x = torch_runner_model(spec, depth, precision, cfg.batch, cfg.device)
        return TorchRunner(model, x, cfg.device, cfg.clock), None
    model = build_model(spec, depth, learngene)
    path = export_artifact(model, precision, cfg.backend, workdir, cfg.batch)
    if cfg.backend == "onnxruntime":
        return OrtRunner(path, spec, cfg.batch, cfg.threads, cfg.device, cfg.clock), str(path)
    return TensorRTRunner(path, spec, cfg.batch), str(path)


# ---------------------------------------------------------------------------------------------
# The protocol


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_runners(runners: dict[int, Runner], cfg: MeasureConfig,
                 tick: Callable[[], None] | None = None) -> dict[int, dict[str, float]]:
    """Warm up, then ``cfg.rounds`` interleaved rounds over all depths (plus up to ``cfg.extra_rounds``
    while some depth's p50 has not settled, e.g. a neighbour's burst of load); statistics per depth."""
    reps: dict[int, int] = {}
    for depth, run in runners.items():
        warm = [run() for _ in range(max(cfg.warmup, 1))]
        per_call_s = min(warm) / 1e3
        reps[depth] = max(cfg.min_reps, min(cfg.max_reps, round(cfg.round_seconds / max(per_call_s, 1e-6))))
    samples: dict[int, list[float]] = {d: [] for d in runners}
    round_p50: dict[int, list[float]] = {d: [] for d in runners}
    round_p90: dict[int, list[float]] = {d: [] for d in runners}
    rng = random.Random(cfg.seed)
    order = list(runners)
    for r in range(cfg.rounds + cfg.extra_rounds):
        if r >= cfg.rounds and all(
            _se(round_p50[d]) <= cfg.settle_rel_se * statistics.median(round_p50[d]) for d in runners
        ):
            break
        rng.shuffle(order)
        for depth in order:
            # One untimed call after switching models: the first call after another model ran finds
            # this one's weights evicted from the caches, which a model serving back to back never
            # sees; with few reps per round it would land in the p90.
            runners[depth]()
            times = [runners[depth]() for _ in range(reps[depth])]
            samples[depth] += times
            round_p50[depth].append(statistics.median(times))
            round_p90[depth].append(_percentile(times, 0.9))
        if tick is not None:
            tick()
    stats = {}
    for depth, xs in samples.items():
        k = len(round_p50[depth])
        stats[depth] = {
            "p50": statistics.median(xs), "p90": _percentile(xs, 0.9), "p99": _percentile(xs, 0.99),
            "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
            "rounds": k, "p50_se": _se(round_p50[depth]), "p90_se": _se(round_p90[depth]),
        }
    return stats


def _se(values: Sequence[float]) -> float:
    """Standard error of the mean of per-round statistics."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def peak_memory_mb(cfg: MeasureConfig, spec: ViTSpec, depth: int, precision: str, artifact: str | None) -> float:
    """Peak memory of one point, in a fresh interpreter (see ``_probe``)."""
    payload = {"backend": cfg.backend, "device": cfg.device, "spec": spec.to_dict(), "depth": depth,
               "precision": precision, "batch": cfg.batch, "threads": cfg.threads, "artifact": artifact}
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "tleg_deploy.profile._probe", json.dumps(payload)],
                          capture_output=True, text=True, env=env, check=False, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BackendError(f"memory probe for depth {depth} ({precision}) failed: {tail}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


def measure_points(
    spec: ViTSpec, cfg: MeasureConfig, precision: str, *, learngene: Any = None,
    progress: Callable[[str, float], None] | None = None,
) -> list[Point]:
    """Measure ``cfg.depths`` in one interleaved session; ``progress(message, fraction)``."""
    require_backend(cfg.backend, cfg.device)
    report = progress or (lambda msg, frac: None)
    with tempfile.TemporaryDirectory(prefix="tleg-profile-") as tmp, _threads(cfg.threads):
        runners: dict[int, Runner] = {}
        artifacts: dict[int, str | None] = {}
        total = len(cfg.depths) * (2 if cfg.memory else 1) + cfg.rounds
        done = 0
        for depth in cfg.depths:
            report(f"{precision}: building depth {depth}", done / total)
            runners[depth], artifacts[depth] = make_runner(cfg, spec, depth, precision, Path(tmp), learngene)
            done += 1

        def tick() -> None:
            nonlocal done
            done += 1
            report(f"{precision}: timing round", done / total)

        stats = time_runners(runners, cfg, tick)
        runners.clear()
        memory: dict[int, float] = {}
        for depth in cfg.depths:
            if cfg.memory:
                report(f"{precision}: peak memory of depth {depth}", done / total)
                memory[depth] = peak_memory_mb(cfg, spec, depth, precision, artifacts[depth])
                done += 1
            else:  # not measured: the weights alone, a lower bound (recorded in the entry's basis)
                from tleg_deploy.plan import costs

                memory[depth] = costs.artifact_bytes(spec, depth, precision) / 1e6
    report(f"{precision}: done", 1.0)
    return [Point(depth=d, p50_ms=s["p50"], p90_ms=s["p90"], p99_ms=s["p99"], mean_ms=s["mean"], std_ms=s["std"],
                  n=int(s["n"]), rounds=int(s["rounds"]), p50_se_ms=s["p50_se"], p90_se_ms=s["p90_se"],
                  memory_mb=memory[d]) for d, s in sorted(stats.items())]


def measure_command(name: str, cfg: MeasureConfig, spec: ViTSpec) -> str:
    parts = [f"tleg-deploy profile --device {name} --backend {cfg.backend}",
             f"--precision {','.join(cfg.precisions)}", f"--spec {spec.preset_name() or 'SPEC'}",
             f"--depths {','.join(map(str, cfg.depths))}", f"--batch {cfg.batch}", f"--threads {cfg.threads}"]
    if cfg.device == "cuda" and cfg.backend != "tensorrt":
        parts.append("--gpu")
    return " ".join(parts) + f" -o profiles/{name}.json"


def runtime_info(cfg: MeasureConfig) -> dict[str, Any]:
    info: dict[str, Any] = {"threads": cfg.threads, "device": cfg.device, "clock": cfg.clock, "warmup": cfg.warmup,
                            "rounds": cfg.rounds, "round_seconds": cfg.round_seconds,
                            "versions": envmod.library_versions()}
    if cfg.backend == "onnxruntime":
        info["options"] = {"intra_op_num_threads": cfg.threads, "inter_op_num_threads": 1,
                           "session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0",
                           "graph_optimization_level": "ORT_ENABLE_ALL"}
    return info


def profile(
    spec: ViTSpec, *, name: str = "host", config: MeasureConfig | None = None, learngene: Any = None,
    quiet: bool = True, aliases: Sequence[str] = (), base: DeviceProfile | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> DeviceProfile:
    """Measure this machine for ``spec`` and return a ``source="measured"`` profile.

    Entries of ``base`` (a profile of the same device/backend) for other specs or precisions are
    kept, so one file can hold several architectures.
    """
    cfg = config or MeasureConfig()
    require_backend(cfg.backend, cfg.device)
    entries: list[Entry] = []
    load_before = _other_load(cfg)
    raw: list[tuple[str, list[Point], list[float]]] = []
    with _progress(quiet, progress) as report:
        for precision in cfg.precisions:
            raw.append((precision, *_linear_session(spec, cfg, precision, learngene, report)))
    busy = max(load_before, _other_load(cfg)) > BUSY_LOAD_PER_CORE
    notes = (f"measured while other processes kept the CPUs busy (load above {BUSY_LOAD_PER_CORE:.0%} of the cores "
             f"besides this measurement): latency intervals widened to ±{BUSY_REL_FLOOR:.0%}; re-measure on a quiet "
             "machine") if busy else ""
    for precision, points, rejected in raw:
        basis: dict[str, Any] = {}
        if rejected:
            basis["rejected_sessions"] = {
                "worst_p50_residual_rel": rejected,
                "why": f"p50 points off a line by more than {cfg.linear_tolerance:.0%} (load burst?); re-measured"}
        if not cfg.memory:
            basis["memory"] = "not measured (--no-memory): weight bytes only, a lower bound"
        if busy:
            basis["busy"] = notes
        entries.append(make_entry(spec, precision, cfg.batch, points, basis=basis or None,
                                  latency_rel_floor=BUSY_REL_FLOOR if busy else QUIET_REL_FLOOR))
    kind = "jetson" if envmod.is_jetson() else ("gpu" if cfg.device == "cuda" else "cpu")
    hardware = {"cpu": {"value": envmod.cpu_model(), "unit": "", "source": "/proc/cpuinfo"},
                "cores": {"value": os.cpu_count(), "unit": "", "source": "os.cpu_count()"}}
    fresh = DeviceProfile(
        name=name, aliases=tuple(aliases), source="measured", kind=kind, backend=cfg.backend,
        measure_command=measure_command(name, cfg, spec), entries=tuple(entries), hardware=hardware,
        runtime=runtime_info(cfg), environment=envmod.environment(cfg.threads),
        host_fingerprint=envmod.host_fingerprint(),
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), notes=notes,
    )
    if base is not None and base.backend == cfg.backend and base.source == "measured":
        return dataclasses.replace(fresh, entries=base.with_entries(entries).entries)
    return fresh


def _linear_session(spec: ViTSpec, cfg: MeasureConfig, precision: str, learngene: Any,
                    report: Callable[[str, float], None]) -> tuple[list[Point], list[float]]:
    """Measure; while the p50 points are not on a line (a block of a ViT always costs the same, so
    that means a disturbed session), re-measure up to ``cfg.retries`` times and keep the most linear
    session. Returns its points and the worst residuals of the sessions set aside."""
    sessions: list[tuple[float, list[Point]]] = []
    for _ in range(1 + cfg.retries):
        points = measure_points(spec, cfg, precision, learngene=learngene, progress=report)
        depths = [p.depth for p in points]
        worst = fit_line(depths, [p.p50_ms for p in points]).worst_residual_rel if len(depths) > 2 else 0.0
        sessions.append((worst, points))
        if worst <= cfg.linear_tolerance:
            break
        report(f"{precision}: points off a line by {worst:.0%}, measuring again", 0.0)
    best = min(range(len(sessions)), key=lambda i: sessions[i][0])
    return sessions[best][1], [w for i, (w, _) in enumerate(sessions) if i != best]


# Relative floor of the latency prediction interval: run-to-run drift between sessions, which one
# session cannot estimate (benchmarks/predictor_accuracy.py measured 2.5-3% median drift between two
# sessions on a quiet machine). Wider when the machine was shared during the measurement.
QUIET_REL_FLOOR = 0.05
BUSY_REL_FLOOR = 0.10
BUSY_LOAD_PER_CORE = 0.5


def _other_load(cfg: MeasureConfig) -> float:
    """1-minute load average not due to this measurement, per core (0 where the OS has none)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return 0.0
    own = cfg.threads if cfg.device == "cpu" else 1
    return max(load - own, 0.0) / (os.cpu_count() or 1)


@contextlib.contextmanager
def _progress(quiet: bool, callback: Callable[[str, float], None] | None) -> Iterator[Callable[[str, float], None]]:
    if quiet:
        yield callback or (lambda msg, frac: None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]profiling[/bold] {task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=1.0)

        def report(msg: str, frac: float) -> None:
            bar.update(task, description=msg, completed=frac)
            if callback is not None:
                callback(msg, frac)

        yield report
