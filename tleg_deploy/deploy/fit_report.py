"""What ``fit`` writes for people: ``REPORT.md`` (budget, pick, predicted vs measured, candidates,
precisions rejected by validation, how to run the model, the next command) and ``build_engine.sh``
(the script to run on the target device). Renders only: ``deploy.fit`` writes the files.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from tleg_deploy.files.datacard import run_snippet
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan import costs
from tleg_deploy.plan.units import format_metrics

if TYPE_CHECKING:
    from tleg_deploy.deploy.fit_types import FitResult
    from tleg_deploy.profile.gemm import MacFloor
    from tleg_deploy.profile.table import DeviceProfile


def build_engine_script(profile: DeviceProfile, chosen: str, precision: str, spec: ViTSpec) -> str:
    """For a TensorRT target, run the member's ``build_engine.sh`` (written by the exporter:
    trtexec engine builds and a Polygraphy check); otherwise an ONNX Runtime timing run of
    ``chosen`` (a path relative to the fit directory)."""
    head = ("#!/usr/bin/env bash\n"
            f"# Written by tleg-deploy fit for {profile.name} ({profile.backend}, {precision}). Run it on the device.\n"
            "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n")
    if profile.backend == "tensorrt":
        member = PurePosixPath(chosen).parent
        done = f"engines built; now replace the estimate with a measurement: {profile.measure_command}"
        return head + f"bash {shlex.quote(str(member / 'build_engine.sh'))}\necho {shlex.quote(done)}\n"
    return head + (
        "PY=${PYTHON:-python3}\n"
        "\"$PY\" - <<'EOF'\nimport numpy as np, onnxruntime as ort, time\n"
        f"s = ort.InferenceSession('{chosen}', providers=['CPUExecutionProvider'])\n"
        f"x = np.zeros((1, {spec.in_chans}, {spec.img_size}, {spec.img_size}), np.float32)\n"
        "for _ in range(10): s.run(None, {'pixel_values': x})\n"
        "t = []\nfor _ in range(100):\n    t0 = time.perf_counter(); s.run(None, {'pixel_values': x})"
        "; t.append((time.perf_counter() - t0) * 1e3)\n"
        "print(f'p50 {np.percentile(t, 50):.3f} ms, p90 {np.percentile(t, 90):.3f} ms')\nEOF\n")


def render_report(result: FitResult, profile: DeviceProfile, chosen_file: str,
                  labels: Mapping[str, Any] | None = None) -> str:
    plan = result.plan
    budget, pct = plan.budget, plan.budget.percentile
    pred = profile.predict(result.depth, spec=plan.spec, precision=result.precision)
    lines = [
        f"# tleg-deploy fit: {profile.name}, depth {result.depth} {result.precision}", "",
        f"- Budget: {budget.describe()}" + (f" (margin {plan.margin:.0%})" if plan.margin else ""),
        f"- Device profile: `{profile.name}` ({profile.backend}, {profile.source})",
        f"- Pick: depth **{result.depth}**, **{result.precision}** ({plan.objective}); binding constraint: "
        f"{plan.binding}",
        f"- Why not deeper{' (solver)' if result.steps else ''}: {plan.why_not_deeper}",
        f"- Figures are **{result.figures}**" + ("" if result.measured else
                                                 f"; measure the real device with `{profile.measure_command}`"),
    ]
    for step in result.steps:
        lines.append(f"- Measured step: {step}")
    if result.finetune:
        lines.append(f"- Fine-tuned: {format_metrics(result.finetune)}")
    for why in result.rejected.values():
        lines.append(f"- Precision {why}; the solver picked again without it")
    for note in result.notes:
        lines.append(f"- Note: {note}")
    lines += ["", "## Predicted vs measured", "", "| figure | predicted (95% upper) | measured | budget |",
              "|---|---|---|---|"]
    lat_pred = pred.latency_p90_ms if pct == "p90" else pred.latency_p50_ms
    lat_up = pred.latency_p90_upper_ms if pct == "p90" else pred.latency_p50_upper_ms
    meas = f"{result.measured.at(pct):.3g} ms" if result.measured else "not run here"
    lines.append(f"| latency {pct} | {lat_pred:.3g} ms ({lat_up:.3g}) | {meas} | "
                 f"{'-' if budget.latency_ms is None else f'{budget.latency_ms:g} ms'} |")
    lines.append(f"| peak memory | {pred.memory_mb:.1f} MB ({pred.memory_upper_mb:.1f}) | not measured | "
                 f"{'-' if budget.memory_mb is None else f'{budget.memory_mb:g} MB'} |")
    spec = plan.spec
    lines.append(f"| params | {costs.params(spec, result.depth):,} (exact) | | "
                 f"{'-' if budget.params is None else f'{budget.params:,}'} |")
    lines.append(f"| MACs | {costs.macs(spec, result.depth):,} (exact) | | "
                 f"{'-' if budget.macs is None else f'{budget.macs:,}'} |")
    floor = _mac_floor(result, profile)
    if floor is not None:
        rate = "int8" if result.precision.startswith("int8") else "fp32"
        lines += ["", f"Physical limit (p50): {floor.describe()}, at this host's 1-thread {rate} GEMM rate "
                  "(measured with the profile); the rest of the latency is spent outside the matrix multiplies."]
    lines += ["", "## Candidates", "", f"| depth | precision | {pct} ms | upper ms | memory MB | params | fits |",
              "|---|---|---|---|---|---|---|"]
    for c in plan.candidates:
        key = (c.depth, c.precision)
        over = result.over_budget.get(c.depth) if c.precision == result.precision else None
        mark = "**pick**" if key == (result.depth, result.precision) else (
            f"no: measured {pct} {over:.3g} ms > {budget.latency_ms:g} ms (predicted to fit)" if over is not None else
            "no: measured over budget" if key == (plan.depth, plan.precision) and result.depth < plan.depth else
            "yes" if c.fits else "no: " + "; ".join(c.violations))
        lines.append(f"| {c.depth} | {c.precision} | {c.latency_ms:.3g} | {c.latency_upper_ms:.3g} | "
                     f"{c.memory_upper_mb:.1f} | {c.params:,} | {mark} |")
    for precision, why in result.rejected.items():
        lines.append(f"| - | {precision} | | | | | no: {why} |")
    if labels is not None:
        lines += ["", "## How to run this model", "",
                  f"Classes (index order) and preprocessing are in `labels.json` "
                  f"({len(labels['classes'])} classes: {', '.join(labels['classes'][:5])}"
                  f"{', ...' if len(labels['classes']) > 5 else ''}). "
                  "In this directory, `python run.py IMAGE` with `run.py`:", "", "```python",
                  run_snippet(dict(labels), chosen_file), "```"]
        if labels.get("note"):
            lines += ["", f"Note: {labels['note']}."]
    lines += ["", "## Next", ""]
    if profile.backend == "tensorrt":
        lines.append(f"On the {profile.name}: `bash build_engine.sh` (builds the TensorRT engine from "
                     f"`{chosen_file}`), then `{profile.measure_command}` to replace the estimate with a measurement.")
    else:
        lines.append(f"`bash build_engine.sh` times `{chosen_file}` with ONNX Runtime on the target; "
                     f"`{profile.measure_command}` re-measures the profile.")
    return "\n".join(lines) + "\n"


def _mac_floor(result: FitResult, profile: DeviceProfile) -> MacFloor | None:
    """The measured pick's MAC floor (``profile.gemm``), or ``None``: not measured here, or a
    profile without the host's GEMM rate."""
    if result.measured is None:
        return None
    from tleg_deploy.profile.gemm import mac_floor

    m = result.measured
    return mac_floor(profile.hardware, costs.macs(result.plan.spec, m.depth, m.batch), m.precision, m.p50_ms,
                     threads=m.threads)
