"""``profile(...)``: measure latency and peak memory of a few depths on this machine and fit the
depth cost model (``table.make_entry``) into a ``DeviceProfile``.

The pieces, one module each: ``config`` (``MeasureConfig``), ``runners`` (whether a backend can
run here; the runner of one point: ONNX Runtime, eager torch or a TensorRT engine), ``timing``
(warm-up and interleaved rounds, statistics per depth), ``memory`` (peak memory in a fresh
subprocess per point). This module runs them in order, one session per precision, and keeps
the session honest: every block of a ViT costs the same, so a session whose p50 points are off a
line by more than ``linear_tolerance`` was likely disturbed (a neighbour's burst of load): it is
measured again, at most ``retries`` times and only until a session repeats an earlier one (then the
curve is the machine's own), the most linear session is kept and the others are recorded in the
entry's ``basis``. Fixed intra-op threads (default 1) are recorded with the profile; a machine
that was busy widens the latency intervals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile import env as envmod
from tleg_deploy.profile.config import MeasureConfig
from tleg_deploy.profile.kit_runner import same_curve
from tleg_deploy.profile.linefit import fit_line
from tleg_deploy.profile.memory import peak_memory_mb
from tleg_deploy.profile.runners import make_runner, require_backend, runner_for_file
from tleg_deploy.profile.table import DeviceProfile, Entry, Point, make_entry
from tleg_deploy.profile.timing import Runner, time_runners

__all__ = ["MeasureConfig", "measure_command", "measure_points", "profile", "runtime_info"]


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class Exported:
    """The files a profiling session exported (depth -> path, in ``workdir``), kept for the next session of
    the same precision: a re-measured session times the same files instead of exporting them again."""

    workdir: Path
    files: dict[int, str] = dataclasses.field(default_factory=dict)


def measure_points(
    spec: ViTSpec, cfg: MeasureConfig, precision: str, *, learngene: Any = None,
    progress: Callable[[str, float], None] | None = None, on_round: Callable[[int], None] | None = None,
    exported: Exported | None = None,
) -> list[Point]:
    """Measure ``cfg.depths`` in one interleaved session; ``progress(message, fraction)``; ``on_round(k)``
    after the k-th timing round (the drift probe re-times its reference mid-session there). With
    ``exported``, files it holds are timed again and the ones exported now are added to it."""
    require_backend(cfg.backend, cfg.device)
    report = progress or (lambda msg, frac: None)
    own_dir = None
    if exported is None:  # the files live as long as this session
        own_dir = tempfile.TemporaryDirectory(prefix="tleg-profile-")
        exported = Exported(Path(own_dir.name))
    with own_dir or contextlib.nullcontext(), _threads(cfg.threads):
        runners: dict[int, Runner] = {}
        artifacts: dict[int, str | None] = {}
        total = len(cfg.depths) * (2 if cfg.memory else 1) + cfg.rounds
        done = 0
        for depth in cfg.depths:
            report(f"{precision}: building depth {depth}", done / total)
            if depth in exported.files:
                path = exported.files[depth]
                runners[depth], artifacts[depth] = runner_for_file(cfg, spec, Path(path)), path
            else:
                runners[depth], artifacts[depth] = make_runner(cfg, spec, depth, precision, exported.workdir,
                                                               learngene)
                if artifacts[depth] is not None:
                    exported.files[depth] = str(artifacts[depth])
            done += 1

        rounds_done = 0

        def tick() -> None:
            nonlocal done, rounds_done
            done += 1
            rounds_done += 1
            report(f"{precision}: timing round", done / total)
            if on_round is not None:
                on_round(rounds_done)

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
    from tleg_deploy.model.spec_text import spec_arg

    parts = [f"tleg-deploy profile --device {name} --backend {cfg.backend}",
             f"--precision {','.join(cfg.precisions)}", f"--spec {spec_arg(spec)}",
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
    raw: list[tuple[str, list[Point], list[float], bool]] = []
    with _progress(quiet, progress) as report, _reference(spec, cfg, report) as (prober, history):
        for precision in cfg.precisions:
            def mid(k: int, precision: str = precision) -> None:
                if prober is not None and k == (cfg.rounds + 1) // 2:
                    history.append(prober.sample(f"{precision} session, round {k}"))

            raw.append((precision, *_linear_session(spec, cfg, precision, learngene, report, mid)))
            if prober is not None:
                history.append(prober.sample(f"after {precision}"))
    probe = None
    if prober is not None:
        ref = next(p for p in raw[0][1] if p.depth == prober.depth)
        probe = prober.info(history, ref.p50_se_ms * math.sqrt(ref.rounds) / ref.p50_ms if ref.p50_ms > 0 else 0.0)
    busy = max(load_before, _other_load(cfg)) > BUSY_LOAD_PER_CORE
    notes = (f"measured while other processes kept the CPUs busy (load above {BUSY_LOAD_PER_CORE:.0%} of the cores "
             f"besides this measurement): latency intervals widened to ±{BUSY_REL_FLOOR:.0%}; re-measure on a quiet "
             "machine") if busy else ""
    for precision, points, rejected, reproduced in raw:
        basis: dict[str, Any] = {}
        if rejected:
            why = f"p50 points off a line by more than {cfg.linear_tolerance:.0%} (load burst?); re-measured"
            if reproduced:
                why += (f"; a re-measured session repeated the curve (within {cfg.linear_tolerance:.0%} up to one "
                        "factor): the curve is this machine's, kept the most linear session")
            basis["rejected_sessions"] = {"worst_p50_residual_rel": rejected, "why": why}
        if not cfg.memory:
            basis["memory"] = "not measured (--no-memory): weight bytes only, a lower bound"
        if busy:
            basis["busy"] = notes
        entries.append(make_entry(spec, precision, cfg.batch, points, basis=basis or None,
                                  latency_rel_floor=BUSY_REL_FLOOR if busy else QUIET_REL_FLOOR))
    kind = "jetson" if envmod.is_jetson() else ("gpu" if cfg.device == "cuda" else "cpu")
    hardware = {"cpu": {"value": envmod.cpu_model(), "unit": "", "source": "/proc/cpuinfo"},
                "cores": {"value": os.cpu_count(), "unit": "", "source": "os.cpu_count()"}}
    if cfg.device == "cpu" and cfg.gemm:
        hardware.update(_gemm_facts(progress))
    fresh = DeviceProfile(
        name=name, aliases=tuple(aliases), source="measured", kind=kind, backend=cfg.backend,
        measure_command=measure_command(name, cfg, spec), entries=tuple(entries), hardware=hardware,
        runtime=runtime_info(cfg), environment=envmod.environment(cfg.threads),
        host_fingerprint=envmod.host_fingerprint(),
        date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), notes=notes, probe=probe,
    )
    if base is not None and base.backend == cfg.backend and base.source == "measured":
        return dataclasses.replace(fresh, entries=base.with_entries(entries).entries)
    return fresh


def _linear_session(spec: ViTSpec, cfg: MeasureConfig, precision: str, learngene: Any,
                    report: Callable[[str, float], None],
                    on_round: Callable[[int], None] | None = None) -> tuple[list[Point], list[float], bool]:
    """Measure; while the p50 points are not on a line (a block of a ViT costs the same, so that
    usually means a disturbed session), re-measure up to ``cfg.retries`` times and keep the most
    linear session. A session that repeats an earlier one's curve (its p50 points the earlier ones
    times one factor, within ``linear_tolerance``) ends the retries: a curve that reproduces is this
    machine's own (cache effects: on an Intel Xeon here the digits model's depth-1 p50 sat 18-28%
    off the line through depths 1, 6, 12 in every session of a quiet machine), not a burst of load.
    Returns the kept points, the worst residuals of the sessions set aside, and whether the curve
    reproduced."""
    sessions: list[tuple[float, list[Point]]] = []
    reproduced = False
    with tempfile.TemporaryDirectory(prefix="tleg-profile-") as tmp:
        exported = Exported(Path(tmp))  # a re-measured session times the files the first one exported
        for attempt in range(1 + cfg.retries):
            if attempt == 0:
                points = measure_points(spec, cfg, precision, learngene=learngene, progress=report,
                                        on_round=on_round, exported=exported)
            else:  # peak memory does not move with a burst of load: the first session's stands
                again = measure_points(spec, dataclasses.replace(cfg, memory=False), precision, learngene=learngene,
                                       progress=report, on_round=on_round, exported=exported)
                memory = {p.depth: p.memory_mb for p in sessions[0][1]}
                points = [dataclasses.replace(p, memory_mb=memory[p.depth]) for p in again]
            depths = [p.depth for p in points]
            worst = fit_line(depths, [p.p50_ms for p in points]).worst_residual_rel if len(depths) > 2 else 0.0
            p50 = {p.depth: p.p50_ms for p in points}
            reproduced = any(same_curve(p50, {p.depth: p.p50_ms for p in earlier}, cfg.linear_tolerance)
                             for _, earlier in sessions)
            sessions.append((worst, points))
            if worst <= cfg.linear_tolerance or reproduced:
                break
            report(f"{precision}: points off a line by {worst:.0%}, measuring again", 0.0)
    best = min(range(len(sessions)), key=lambda i: sessions[i][0])
    return sessions[best][1], [w for i, (w, _) in enumerate(sessions) if i != best], reproduced


@contextlib.contextmanager
def _reference(spec: ViTSpec, cfg: MeasureConfig,
               report: Callable[[str, float], None]) -> Iterator[tuple[Any, list[Any]]]:
    """The drift probe's reference (``drift.Prober``: the first precision at the middle measured depth)
    and its history, timed once at the start; ``(None, [])`` with ``cfg.probe`` off."""
    if not cfg.probe:
        yield None, []
        return
    from tleg_deploy.profile.drift import ProbeProtocol, Prober

    depths = sorted(cfg.depths)
    report("drift probe: building the reference", 0.0)
    prober = Prober(spec, cfg.precisions[0], depths[len(depths) // 2], backend=cfg.backend, device=cfg.device,
                    batch=cfg.batch, protocol=ProbeProtocol(threads=cfg.threads))
    try:
        yield prober, [prober.sample("start")]
    finally:
        prober.close()


def _gemm_facts(progress: Callable[[str, float], None] | None) -> dict[str, Any]:
    """This host's 1-thread GEMM rates (``profile.gemm``, about a second) as ``device.hardware``
    facts; none where ONNX Runtime is missing (the torch backend on a bare machine)."""
    from tleg_deploy.errors import BackendError
    from tleg_deploy.profile.gemm import gemm_facts, measure_gemm

    if progress is not None:
        progress("GEMM throughput (1 thread)", 1.0)
    try:
        return gemm_facts(measure_gemm())
    except BackendError:
        return {}


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
