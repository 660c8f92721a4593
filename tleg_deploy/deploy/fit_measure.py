"""fit's measured loop (step 3 of ``deploy.fit``): where the device profile was measured on this host, time
an unvalidated export of the planned depth here, step shallower while it misses the latency budget, and deeper
while the next depth still measures within it and meets every other budget, at most ``max_steps`` each way."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tleg_deploy.errors import BackendError, InfeasibleError
from tleg_deploy.plan.precisions import deployed_kind
from tleg_deploy.plan.solve import Plan, evaluate
from tleg_deploy.profile.artifact import Measurement

if TYPE_CHECKING:
    from tleg_deploy.deploy.fit_types import FitRequest
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.vit import ViT
    from tleg_deploy.profile.table import DeviceProfile

Log = Callable[[str], None]


def measured_check(request: FitRequest, plan: Plan, profile: DeviceProfile, lg: Learngene, limit: float,
                    staging: Path, say: Log) -> tuple[int, Measurement, list[str], dict[int, float]]:
    """Time an export of the planned depth; while it misses the ``limit`` (ms, at the budget's percentile),
    one block shallower; once it fits (without having stepped down), while the next deeper depth still
    measures within the limit and meets every other budget (``_deeper_allowed``), one block deeper. Each
    direction takes at most ``request.max_steps`` steps. Returns the depth, its measurement, the steps
    (predicted vs measured) and the depths measured over budget; raises ``InfeasibleError`` if the last
    depth tried still misses. Latency does not depend on the weights, so this times the expansion,
    unvalidated."""
    from tleg_deploy.model.expansion import expand
    from tleg_deploy.profile.artifact import measure_onnx

    pct = request.budget.percentile

    def timed(depth: int) -> Measurement:
        say(f"timing depth {depth} {plan.precision} here ...")
        path = _timing_file(expand(lg, depth).eval(), plan.precision, staging / ".timing")
        measured = measure_onnx(path, plan.spec, depth=depth, precision=plan.precision, threads=_threads(profile))
        ms = measured.at(pct)
        if not math.isfinite(ms) or ms <= 0:
            raise BackendError(f"depth {depth} {plan.precision} measured {pct} {ms} ms, not a latency",
                               hint="re-run; if it persists, re-measure the profile with --refresh-profile")
        say(f"measured depth {depth}: {pct} {ms:.3g} ms (budget {limit:g} ms)")
        return measured

    def step(depth: int, ms: float, outcome: str) -> str:
        c = evaluate(profile, request.budget, spec=plan.spec, depth=depth, precision=plan.precision)
        return (f"depth {depth} predicted {pct} {c.latency_ms:.3g} ms (upper {c.latency_upper_ms:.3g}), measured "
                f"{ms:.3g} ms {'>' if ms > limit else '<='} {limit:g} ms: {outcome}")

    steps: list[str] = []
    over: dict[int, float] = {}
    depth = plan.depth
    measured = timed(depth)
    while measured.at(pct) > limit and depth > 1 and len(steps) < request.max_steps:
        over[depth] = measured.at(pct)
        steps.append(step(depth, measured.at(pct), f"stepped to depth {depth - 1}"))
        depth -= 1
        measured = timed(depth)
    ups, stepped_down = 0, bool(steps)
    while not stepped_down and measured.at(pct) <= limit and ups < request.max_steps and _deeper_allowed(
            request, plan, profile, depth + 1, say):
        deeper = timed(depth + 1)
        if deeper.at(pct) > limit:
            over[depth + 1] = deeper.at(pct)
            steps.append(step(depth + 1, deeper.at(pct), f"stays at depth {depth}"))
            break
        ups += 1
        steps.append(step(depth + 1, deeper.at(pct), f"stepped up to depth {depth + 1}"))
        depth, measured = depth + 1, deeper
    shutil.rmtree(staging / ".timing", ignore_errors=True)
    if measured.at(pct) > limit:
        raise InfeasibleError(
            f"depth {depth} {plan.precision} measured {pct} {measured.at(pct):.3g} ms over the {limit:g} ms "
            f"budget after {len(steps)} step(s) shallower",
            hint="the host profile may be stale or the machine busy: re-measure with --refresh-profile "
                 "or raise the budget")
    return depth, measured, steps, over


def _deeper_allowed(request: FitRequest, plan: Plan, profile: DeviceProfile, depth: int, say: Log) -> bool:
    """Whether a measured step up to ``depth`` may be tried: the objective is depth, ``depth`` is within the
    search's max depth and meets every budget but latency (memory, params, MACs, bytes; predicted, with the
    margin), which the measurement decides."""
    if plan.objective != "deepest" or depth > plan.max_depth:
        return False
    s = request.search
    c = evaluate(profile, request.budget, spec=plan.spec, depth=depth, precision=plan.precision, margin=s.margin,
                 accuracy=s.accuracy)
    broken = [why for name, why in zip(c.violated, c.violations, strict=True) if name != "latency"]
    if broken:
        say(f"not stepping up to depth {depth}: {'; '.join(broken)}")
    return not broken


def _timing_file(model: ViT, precision: str, out: Path) -> Path:
    """The ONNX file ONNX Runtime runs ``model`` at ``precision`` from, for timing only (not validated)."""
    from tleg_deploy.export.onnx import export_onnx
    from tleg_deploy.export.quantize import convert_fp16, quantize_int8

    out.mkdir(exist_ok=True)
    fp32 = export_onnx(model, out / "model.onnx")
    kind = deployed_kind(precision, "onnxruntime")
    if kind == "int8":
        return quantize_int8(fp32, out / "model_int8.onnx")
    return convert_fp16(fp32, out / "model_fp16.onnx") if kind == "fp16" else fp32


def _threads(profile: DeviceProfile) -> int:
    threads = profile.runtime.get("threads", 1)
    return threads if isinstance(threads, int) and threads > 0 else 1
