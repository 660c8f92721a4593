"""Shared by the benchmark scripts: describe the machine, and write one benchmark's results.

Each script writes ``benchmarks/results/<name>.json`` (machine-readable, read by ``tleg-deploy
report``) and ``benchmarks/results/<name>.md`` (its section of RESULTS.md); ``make_results.py``
joins the sections into ``benchmarks/RESULTS.md``. Numbers here always come from a run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def spec_names(text: str) -> list[str]:
    """``--specs a,b``: the preset names, checked (an argparse ``type``: a wrong name is one usage line, exit 2)."""
    from tleg_deploy.model.spec import PRESETS

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown spec preset(s) {', '.join(map(repr, unknown)) or repr(text)}; choose from {', '.join(PRESETS)}")
    return names


def spec_name(text: str) -> str:
    """``--spec a``: one preset name, checked like ``spec_names``."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"one spec preset, not a list: {text!r}")
    return spec_names(text)[0]


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for mod in ("torch", "onnxruntime", "onnx", "numpy"):
        with contextlib.suppress(ImportError):
            versions[mod] = __import__(mod).__version__
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "python": platform.python_version(),
        "versions": versions, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
    }


def machine_line(info: dict[str, Any]) -> str:
    v = ", ".join(f"{k} {val}" for k, val in info["versions"].items())
    return f"Machine: {info['cpu']}, {info['cores']} cores, {info['os']}; {v}; run {info['date']} at {info['commit']}."


def _plain(value: Any) -> Any:
    """``value`` as plain JSON: a NaN or infinite float becomes null (the benchmarks use NaN in memory for "not
    measured": an infeasible budget's closed loop, the next deeper depth past the search's max; bare NaN is not
    JSON), an object JSON has no type for its ``str`` (a path)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_result(name: str, data: dict[str, Any], markdown: str) -> None:
    """Write results/<name>.json (with machine info) and results/<name>.md, then refresh RESULTS.md. Each file
    is written whole or not at all (a Ctrl-C here leaves the previous run's file, never half of the new one)."""
    from tleg_deploy.files.fileio import write_json_atomic, write_text_atomic

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    payload = {"benchmark": name, "machine": info, **data}
    write_json_atomic(RESULTS_DIR / f"{name}.json", _plain(payload))
    write_text_atomic(RESULTS_DIR / f"{name}.md", markdown.rstrip() + f"\n\n_{machine_line(info)}_\n")
    from make_results import build  # type: ignore[import-not-found]

    build()
