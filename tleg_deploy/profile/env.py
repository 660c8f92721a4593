"""What a measurement ran on: CPU model and flags, cores, OS, library versions, GPU and driver,
and on a Jetson the power mode (``nvpmodel -q``) and whether the clocks are pinned.

Also the *host fingerprint* that keys the cached ``host`` profile: it changes when the CPU, the
core count, the OS kernel or a runtime library changes, so a stale measurement is re-taken.
Stdlib only; library versions come from package metadata, so nothing heavy is imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

# CPU features that change ML-kernel speed; the full flag list is long and mostly irrelevant.
_INTERESTING_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
    "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimdhp", "asimddp", "sve", "i8mm", "bf16",
)
_LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "numpy", "tensorrt")


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return info
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        if key in ("model name", "flags", "Features", "Hardware", "CPU part") and key not in info:
            info[key] = value
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in _INTERESTING_FLAGS if f in flags]


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def gpu_info() -> list[dict[str, str]]:
    """GPUs seen by ``nvidia-smi`` (name, driver, memory); empty without one."""
    text = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    gpus = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus


def is_jetson() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def jetson_info() -> dict[str, Any] | None:
    """Power mode and clock pinning on a Jetson (``None`` elsewhere)."""
    if not is_jetson():
        return None
    release = Path("/etc/nv_tegra_release").read_text(errors="replace").splitlines()[0:1]
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    cur = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_min_freq")
    top = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq")
    return {
        "l4t": release[0] if release else "",
        "power_mode": _run(["nvpmodel", "-q"]) or "unknown (nvpmodel not readable)",
        "cpu_governor": governor,
        # jetson_clocks sets min = max frequency; without it timings drift with DVFS.
        "clocks_pinned": bool(cur and top and cur == top),
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def environment(threads: int | None = None) -> dict[str, Any]:
    """Everything a profile records about where it was measured."""
    env: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
        "os": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
        "libraries": library_versions(), "gpus": gpu_info(),
    }
    if threads is not None:
        env["threads"] = threads
    jetson = jetson_info()
    if jetson is not None:
        env["jetson"] = jetson
    with contextlib.suppress(OSError):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    env["cpu_mhz"] = cpu_mhz()
    return env


@functools.cache  # it asks nvidia-smi (a subprocess): once per process is enough
def host_fingerprint() -> str:
    """Short hash of what makes timings on this machine comparable."""
    facts = {
        "cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(), "machine": platform.machine(),
        "system": platform.system(), "release": platform.release(), "libraries": library_versions(),
        "gpus": [g["name"] for g in gpu_info()],
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def cpu_mhz() -> dict[str, Any]:
    """Current CPU clock where readable: ``/proc/cpuinfo`` "cpu MHz" per CPU and the cpufreq driver's
    ``scaling_cur_freq`` (kHz, shown in MHz); each ``None`` where the OS does not expose it (a VM often
    reports only the nominal clock in cpuinfo and no cpufreq)."""
    info: list[float] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                with contextlib.suppress(ValueError):
                    info.append(round(float(value), 1))
    scaling: list[float] = []
    for path in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq")):
        text = _read(str(path))
        with contextlib.suppress(TypeError, ValueError):
            scaling.append(round(int(text or "") / 1e3, 1))
    return {"cpuinfo_mhz": info or None, "scaling_cur_freq_mhz": scaling or None}


def conditions() -> dict[str, Any]:
    """The machine's state now (what a timing depends on besides the code): UTC time, load average
    (1/5/15 min, ``None`` where the OS has none) and CPU clocks (``cpu_mhz``)."""
    import datetime as dt

    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {"time": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "load_average": load,
            "cores": os.cpu_count(), **cpu_mhz()}
