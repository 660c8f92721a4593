"""Readers for what NVIDIA's ``trtexec`` writes, as a device kit keeps it (``tleg_deploy.profile.kit``):

- ``--exportTimes=FILE``: a JSON array with one object per inference. TensorRT 8.x and 10.x name
  the fields ``startEnqMs``/``endEnqMs``, ``startH2dMs``…``endD2hMs``, ``h2dMs``, ``computeMs``,
  ``d2hMs`` and ``latencyMs`` (H2D + compute + D2H); 7.x used ``inMs``/``outMs``/``endToEndMs``
  (the ``trace.py`` script shipped with trtexec). We read ``computeMs`` — GPU time of the engine,
  which is what ``runners.TensorRTRunner`` times with CUDA events — or, where absent,
  ``endComputeMs - startComputeMs``.
- the log: the version (``&&&& RUNNING TensorRT.trtexec [TensorRT v8601]``: 8.6.1, ``v100300``:
  10.3.0), the performance summary (``Latency: min = … ms, max = …, mean = …, median = …,
  percentile(90%) = …``; ``GPU Compute Time: …`` likewise), and the device memory TensorRT
  reports: ``[MemUsageChange] TensorRT-managed allocation in IExecutionContext creation: CPU +0,
  GPU +N, now: CPU a, GPU b (MiB)`` — the last such ``now: … GPU b`` is the engine plus the
  context's activations, in MiB.

The fixtures in ``tests/data/trtexec/`` follow these formats as quoted in public GitHub issues of
TensorRT 8.6 and 10.x users. Every reader raises ``FormatError`` naming the file on anything
truncated, missing or non-finite. Stdlib only.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tleg_deploy.errors import FormatError, NonFiniteError

MIB = 1024 * 1024
_VERSION = re.compile(r"\[TensorRT v(\d+)\]")
_VERSION_TEXT = re.compile(r"TensorRT version: (\d+)\.(\d+)\.(\d+)")
_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+)%\))\s*=\s*([-+0-9.eEinfaINFA]+)\s*ms")
_MEM = re.compile(r"\[MemUsageChange\][^\n]*?TensorRT-managed allocation[^\n]*?now: CPU \d+, GPU (\d+) \(MiB\)")


def version_from_log(text: str) -> str | None:
    """``'8.6.1'`` / ``'10.3.0'`` from a trtexec log or ``--help`` output, ``None`` if not there."""
    m = _VERSION.search(text)
    if m:
        n = int(m.group(1))
        if n >= 100000:  # 10.x on: major * 10000 + minor * 100 + patch
            return f"{n // 10000}.{n // 100 % 100}.{n % 100}"
        return f"{n // 1000}.{n // 100 % 10}.{n % 100}"  # 8.x: major * 1000 + minor * 100 + patch
    m = _VERSION_TEXT.search(text)
    return ".".join(m.groups()) if m else None


def summary(text: str, metric: str = "GPU Compute Time") -> dict[str, float]:
    """The performance summary line of ``metric`` (``Latency``, ``GPU Compute Time``, ``H2D Latency``…)
    as ``{"min", "max", "mean", "median", "p90", "p95", "p99"}`` in ms."""
    for line in reversed(text.splitlines()):
        head = line.split("] ")[-1] if "] " in line else line
        if head.startswith(f"{metric}:"):
            stats: dict[str, float] = {}
            for name, pct, value in _STAT.findall(head):
                stats[f"p{pct}" if pct else name] = _finite(value, f"{metric} {name}")
            if "median" not in stats:
                raise FormatError(f"trtexec summary line for {metric!r} has no median: {head.strip()!r}")
            return stats
    raise FormatError(f"no {metric!r} line in the trtexec performance summary",
                      hint="the run was cut short, or the log is not from trtexec")


def device_memory_mib(text: str) -> float:
    """TensorRT-managed device memory once the execution context exists (MiB): the last report."""
    found = _MEM.findall(text)
    if not found:
        raise FormatError("no '[MemUsageChange] TensorRT-managed allocation … GPU' line in the trtexec log",
                          hint="the run stopped before the engine was loaded; run the kit again")
    return float(found[-1])


def compute_times_ms(text: str, where: str = "--exportTimes file") -> list[float]:
    """Per-inference GPU compute times (ms) from an ``--exportTimes`` JSON text."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{where} is not complete JSON ({e.msg} at line {e.lineno})",
                          hint="the run was cut short; run the kit again") from None
    if not isinstance(data, list):
        raise FormatError(f"{where} is not a JSON array of inferences")
    times: list[float] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise FormatError(f"{where}[{i}] is not an object")
        if "computeMs" in item:
            value = item["computeMs"]
        elif "startComputeMs" in item and "endComputeMs" in item:
            value = number(item["endComputeMs"], f"{where}[{i}].endComputeMs") - number(
                item["startComputeMs"], f"{where}[{i}].startComputeMs")
        else:
            continue  # e.g. a {"count": N} header some versions write
        t = number(value, f"{where}[{i}].computeMs")
        if t <= 0:
            raise FormatError(f"{where}[{i}].computeMs is {t!r}, not a positive time")
        times.append(t)
    if not times:
        raise FormatError(f"{where} holds no inference times", hint="the run was cut short; run the kit again")
    return times


@dataclass(frozen=True)
class TrtRun:
    """One timing run of one engine: per-inference GPU times and what its log reports."""

    times_ms: tuple[float, ...]
    memory_mib: float
    version: str | None
    median_ms: float  # the log's GPU Compute Time median (a cross-check of the times file)


def read_run(times_file: Path, log_file: Path) -> TrtRun:
    """Read one run's ``--exportTimes`` file and log; the two must agree on the median (±25%)."""
    for f in (times_file, log_file):
        if not f.is_file():
            raise FormatError(f"result file {f.name} is missing", hint="the kit did not finish; run it again")
    text = log_file.read_text(errors="replace")
    times = compute_times_ms(times_file.read_text(errors="replace"), times_file.name)
    try:
        median = summary(text)["median"]
    except FormatError as e:
        raise FormatError(f"{log_file.name}: {e.message}", hint=e.hint) from None
    ours = sorted(times)[len(times) // 2]
    if not 0.75 <= ours / median <= 1.25:
        raise FormatError(f"{times_file.name} (median {ours:.4g} ms) does not belong to {log_file.name} "
                          f"(median {median:.4g} ms)", hint="the results were mixed up or edited; run the kit again")
    try:
        memory = device_memory_mib(text)
    except FormatError as e:
        raise FormatError(f"{log_file.name}: {e.message}", hint=e.hint) from None
    return TrtRun(times_ms=tuple(times), memory_mib=memory, version=version_from_log(text), median_ms=median)


def _finite(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise FormatError(f"trtexec {what} is {text!r}, not a number") from None
    if not math.isfinite(value):
        raise NonFiniteError(f"trtexec {what} is {value!r}", hint="a broken run; run the kit again")
    return value


def number(value: object, where: str) -> float:
    """A finite JSON number from a kit's results (``NonFiniteError`` for NaN/Inf: never imported)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{where} is {value!r}, not a number")
    if not math.isfinite(value):
        raise NonFiniteError(f"{where} is {value!r}", hint="a broken run; run the kit again")
    return float(value)
