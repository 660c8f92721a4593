"""``fit(FitRequest(budget, device=...))``: the main job, from a learngene to a deployable directory.

    1 resolve the device profile (``host`` is measured on first use); a      ``_resolve_profile``
      measured profile of this host is drift-probed (``profile.drift``)
    2 solve: the deepest (or most accurate) depth x precision that fits,      ``_solve``
      with confidence
    3 expand the learngene (Xia et al., AAAI 2024) to that depth and export   ``_build``, ``_export``
      it to ONNX (fp32 + the chosen precision's variant), validated against PyTorch
    4 on a device we can run here (the profile was measured on this host with ``_measured_check``
      ONNX Runtime), time the exported artifact; if it misses the latency budget, step one block
      shallower and say so (at most ``max_steps`` times)
    5 fine-tune if data is given (latency does not depend on the weights, so  ``_finetune``
      this runs once, at the final depth, after the measured check), then export and validate the
      trained weights
    6 write the directory: descendant weights, ONNX files, ``plan.json``,      ``_write_outputs``
      ``manifest.json``, ``build_engine.sh`` for the target and ``REPORT.md``

The directory is built next to its destination and renamed into place at the end (``_staged``), so
Ctrl-C leaves nothing half-written. Up to step 2 nothing imports torch (``fit --device jetson`` needs
no GPU; the solver and profile tables are torch-free) except the drift probe of this host's profile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tleg_deploy.deploy.fit_report import build_engine_script, render_report
from tleg_deploy.deploy.fit_types import FIT_FORMAT, FitRequest, FitResult
from tleg_deploy.errors import ExportError, InfeasibleError
from tleg_deploy.files.fileio import sha256_file, write_json_atomic, write_text_atomic
from tleg_deploy.plan.precisions import deployed_kind, export_formats
from tleg_deploy.plan.solve import Plan, evaluate, solve
from tleg_deploy.profile.artifact import Measurement

if TYPE_CHECKING:
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.model.vit import ViT
    from tleg_deploy.profile.table import DeviceProfile

Log = Callable[[str], None]
Export = Callable[["ViT", str], str]  # (model, source) -> the chosen precision's file in the staging directory


@dataclass(frozen=True)
class _Built:
    """What steps 3-5 made: the model at its final depth, its exported file and how it was checked."""

    model: ViT
    chosen: str                              # the chosen precision's ONNX file, relative to the directory
    measured: Measurement | None
    steps: tuple[str, ...]
    finetune: dict[str, Any] | None


def fit(request: FitRequest, *, quiet: bool = True, log: Log | None = None) -> FitResult:
    """Run the whole job (module docstring); returns what was built and why."""
    say = log or (lambda _msg: None)
    _check_destination(request.out_dir)
    from tleg_deploy.model.resources import learngene_spec

    spec = learngene_spec(request.learngene)
    profile = _resolve_profile(request, spec, quiet, say)
    plan = _solve(request, profile, spec, say)

    # -- torch from here on ---------------------------------------------------------------------
    from tleg_deploy.model.resources import load_learngene

    lg = load_learngene(request.learngene)
    with _staged(request.out_dir) as staging:
        built = _build(request, plan, profile, lg, staging, quiet, say)
        result = _result(request, plan, profile, built)
        _write_outputs(staging, result, profile, built, lg, request)
        files = tuple(sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()))
    return dataclasses.replace(result, files=files)


# ---------------------------------------------------------------------------------------------
# Steps 1-2: torch-free


def _resolve_profile(request: FitRequest, spec: ViTSpec, quiet: bool, log: Log | None = None) -> DeviceProfile:
    if not isinstance(request.device, str):
        return request.device
    from tleg_deploy.profile.drift import probe_and_apply
    from tleg_deploy.profile.registry import resolve_profile

    prof = resolve_profile(request.device, spec=spec, refresh=request.refresh_profile, quiet=quiet)
    # The drift probe (about 1 s): says how fast this host is now against its profile, rescales beyond ±5%.
    return probe_and_apply(prof, log=log) if prof.source == "measured" else prof


def _solve(request: FitRequest, profile: DeviceProfile, spec: ViTSpec, say: Log) -> Plan:
    s = request.search
    plan = solve(profile, request.budget, spec=spec, max_depth=s.max_depth, precisions=s.precisions,
                 objective=s.objective, margin=s.margin, accuracy=s.accuracy)
    say(f"solved on {profile.name} ({profile.source} profile): depth {plan.depth} {plan.precision} "
        f"({plan.binding} binds)")
    return plan


def _runs_here(profile: DeviceProfile) -> bool:
    """A measured ONNX Runtime CPU profile of this very host: we can time the artifact ourselves."""
    if profile.source != "measured" or profile.backend != "onnxruntime" or profile.kind != "cpu":
        return False
    from tleg_deploy.profile.env import host_fingerprint

    return profile.host_fingerprint == host_fingerprint()


# ---------------------------------------------------------------------------------------------
# Steps 3-5: build, check, fine-tune


def _build(request: FitRequest, plan: Plan, profile: DeviceProfile, lg: Learngene, staging: Path, quiet: bool,
           say: Log) -> _Built:
    """Expand to the planned depth, check it where it can be measured here (stepping shallower), fine-tune
    if asked; the staging directory ends up holding the export of the model returned."""

    def export(model: ViT, source: str) -> str:
        _clear(staging)
        return _export(model, source=source, lg=lg, learngene=request.learngene, precision=plan.precision,
                       profile=profile, out=staging, data=request.finetune_data or "digits", say=say)

    from tleg_deploy.model.expansion import expand

    limit = request.budget.latency_ms
    if request.measure and limit is not None and _runs_here(profile):
        built = _measured_check(request, plan, profile, lg, limit, export, staging, say)
    else:
        built = _Built(expand(lg, plan.depth).eval(), "", None, (), None)
    if request.finetune_data is not None:  # exported once, trained: the expansion's export was only for timing
        model, metrics = _finetune(built.model, request.finetune_data, request.epochs, quiet, say)
        chosen = export(model, f"finetune:{request.finetune_data}:{request.epochs}")
        return dataclasses.replace(built, model=model, chosen=chosen, finetune=metrics)
    if not built.chosen:
        return dataclasses.replace(built, chosen=export(built.model, "expand"))
    return built


def _measured_check(request: FitRequest, plan: Plan, profile: DeviceProfile, lg: Learngene, limit: float,
                    export: Export, staging: Path, say: Log) -> _Built:
    """Export and time the planned depth; while it misses the ``limit`` (ms, at the budget's percentile),
    one block shallower, at most ``request.max_steps`` times. Raises ``InfeasibleError`` if the last
    depth tried still misses."""
    from tleg_deploy.model.expansion import expand
    from tleg_deploy.profile.artifact import measure_onnx

    pct = request.budget.percentile

    def timed(depth: int) -> tuple[ViT, str, Measurement]:
        model = expand(lg, depth).eval()
        chosen = export(model, "expand")
        measured = measure_onnx(staging / chosen, plan.spec, depth=depth, precision=plan.precision,
                                threads=_threads(profile))
        say(f"measured depth {depth}: {pct} {measured.at(pct):.3g} ms (budget {limit:g} ms)")
        return model, chosen, measured

    steps: list[str] = []
    depth = plan.depth
    model, chosen, measured = timed(depth)
    while measured.at(pct) > limit and depth > 1 and len(steps) < request.max_steps:
        steps.append(f"depth {depth} measured {pct} {measured.at(pct):.3g} ms > {limit:g} ms: "
                     f"stepped to depth {depth - 1}")
        depth -= 1
        model, chosen, measured = timed(depth)
    if measured.at(pct) > limit:
        raise InfeasibleError(
            f"depth {depth} {plan.precision} measured {pct} {measured.at(pct):.3g} ms over the {limit:g} ms "
            f"budget after {len(steps)} step(s) shallower",
            hint="the host profile may be stale or the machine busy: re-measure with --refresh-profile "
                 "or raise the budget")
    return _Built(model, chosen, measured, tuple(steps), None)


def _threads(profile: DeviceProfile) -> int:
    threads = profile.runtime.get("threads", 1)
    return threads if isinstance(threads, int) and threads > 0 else 1


def _export(model: ViT, *, source: str, lg: Learngene, learngene: str, precision: str, profile: DeviceProfile,
            out: Path, data: str, say: Log) -> str:
    """Export and validate ``model`` as a one-member family in ``out`` (its ``manifest.json`` is the
    one format every export directory carries); returns the chosen precision's file, relative to ``out``."""
    from tleg_deploy.export.family import export_family
    from tleg_deploy.model.resources import learngene_path

    manifest = export_family(lg, [model.depth], out, export_formats(precision, profile.backend), data=data,
                             learngene_file=learngene_path(learngene), models={model.depth: model}, source=source,
                             profile=profile)
    wanted = deployed_kind(precision, profile.backend)
    files = [a["file"] for a in manifest["artifacts"] if a["format"] == "onnx"]
    say(f"exported and validated depth {model.depth}: {', '.join(files)}")
    return next(a["file"] for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == wanted)


def _finetune(model: ViT, data: str, epochs: int, quiet: bool, say: Log) -> tuple[ViT, dict[str, Any]]:
    from tleg_deploy.train.finetune import finetune
    from tleg_deploy.train.loop import RunOptions, TrainConfig

    say(f"fine-tuning depth {model.depth} on {data} for {epochs} epoch(s)")
    res = finetune(model, data, TrainConfig(epochs=epochs), RunOptions(quiet=quiet))
    return res.model.eval(), {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}


def _clear(d: Path) -> None:
    for f in d.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()


# ---------------------------------------------------------------------------------------------
# Step 6: the result and the directory


def _result(request: FitRequest, plan: Plan, profile: DeviceProfile, built: _Built) -> FitResult:
    """The pick at the depth built (re-evaluated if the measured check stepped shallower) and the notes."""
    budget, s = request.budget, request.search
    depth = built.model.depth
    pick = plan.pick if depth == plan.depth else evaluate(
        profile, budget, spec=plan.spec, depth=depth, precision=plan.precision, margin=s.margin, accuracy=s.accuracy)
    notes = list(plan.warnings)
    if not (request.measure and _runs_here(profile)) and profile.source == "measured":
        notes.append(f"{profile.name} cannot be run here: figures are predicted, not measured")
    measured = built.measured
    if measured is not None and measured.at(budget.percentile) < 0.5 * pick.latency_ms:
        notes.append(f"measured {budget.percentile} {measured.at(budget.percentile):.3g} ms is under half the "
                     f"predicted {pick.latency_ms:.3g} ms: the profile was probably taken under load; "
                     "re-measure with --refresh-profile for a deeper pick")
    return FitResult(plan=plan, pick=pick, out_dir=request.out_dir, files=(), measured=measured, steps=built.steps,
                     finetune=built.finetune, measure_command=profile.measure_command, notes=tuple(notes))


def _write_outputs(d: Path, result: FitResult, profile: DeviceProfile, built: _Built, lg: Learngene,
                   request: FitRequest) -> None:
    """The descendant's weights, build_engine.sh, plan.json and REPORT.md next to the manifest and ONNX
    files ``export_family`` wrote."""
    from tleg_deploy.model.expansion import save_descendant

    weights = f"model_d{result.depth}.safetensors"
    save_descendant(built.model, d / weights, lg.sha256(), {
        "made_by": "tleg-deploy fit", "learngene": str(request.learngene), "device": profile.name,
        "budget": request.budget.to_dict(), "finetune": built.finetune})
    write_text_atomic(d / "build_engine.sh", build_engine_script(profile, built.chosen, result.precision,
                                                                 result.plan.spec))
    with contextlib.suppress(OSError):
        os.chmod(d / "build_engine.sh", 0o755)
    write_json_atomic(d / "plan.json", {**result.to_dict(), "weights": {
        "file": weights, "bytes": (d / weights).stat().st_size, "sha256": sha256_file(d / weights)}})
    write_text_atomic(d / "REPORT.md", render_report(result, profile, built.chosen))


# ---------------------------------------------------------------------------------------------
# Where the directory goes


def _check_destination(out: Path) -> None:
    """Refuse, before any work, a destination that is not empty and not an earlier fit output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_fit_output(out))):
        raise ExportError(f"{out} exists and is not an earlier fit output", hint="choose another -o")


def _is_fit_output(out: Path) -> bool:
    try:
        return bool(json.loads((out / "plan.json").read_text()).get("format") == FIT_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh directory next to ``out`` to build in. Swapped into place when the block ends (an earlier
    fit output is replaced only once the new one is whole); removed if it raises (Ctrl-C included)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
