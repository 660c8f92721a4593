"""``fit(budget, device=...)``: the main job, from a learngene to a deployable directory.

    1 resolve the device profile (``host`` is measured on first use)
    2 solve: the deepest (or most accurate) depth x precision that fits, with confidence
    3 expand the learngene (Xia et al., AAAI 2024) to that depth
    4 export to ONNX (fp32 + the chosen precision's variant) and validate against PyTorch
    5 on a device we can run here (the profile was measured on this host with ONNX Runtime), time
      the exported artifact; if it misses the latency budget, step one block shallower and say so
      (at most ``max_steps`` times)
    6 fine-tune if data is given (latency does not depend on the weights, so this runs once, at the
      final depth, after the measured check), then export and validate the trained weights
    7 write the directory: descendant weights, ONNX files, ``plan.json``, ``manifest.json``,
      ``build_engine.sh`` for the target and ``REPORT.md``

The directory is built next to its destination and renamed into place at the end, so Ctrl-C
leaves nothing half-written. A re-run replaces an earlier fit output as a whole, so it refuses one
holding a file fit did not write (``check_destination``, the policy of ``files.outputs``). Up to
step 2 nothing imports torch (``fit --device jetson`` needs no GPU; the solver and profile tables
are torch-free).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tleg_deploy.errors import InfeasibleError
from tleg_deploy.files.fileio import sha256_file, write_json_atomic, write_text_atomic
from tleg_deploy.files.outputs import has_marker, output_dir, staging_dir
from tleg_deploy.plan.solve import DEFAULT_MAX_DEPTH, Budget, Candidate, Plan, check_options, evaluate, solve
from tleg_deploy.profile.artifact import Measurement

if TYPE_CHECKING:
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.vit import ViT
    from tleg_deploy.profile.table import DeviceProfile

FIT_FORMAT = "tleg-fit"
SCHEMA_VERSION = 1
MAX_STEPS = 3

Log = Callable[[str], None]


@dataclass(frozen=True)
class FitResult:
    plan: Plan                               # the solver's answer (before any measured step-down)
    pick: Candidate                          # what was built, with its predicted figures
    out_dir: Path
    files: tuple[str, ...]
    measured: Measurement | None             # None: the target cannot be run here (figures are estimated)
    steps: tuple[str, ...] = ()              # each step shallower, with the measurement that caused it
    finetune: Mapping[str, Any] | None = None
    measure_command: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def depth(self) -> int:
        return self.pick.depth

    @property
    def precision(self) -> str:
        return self.pick.precision

    @property
    def figures(self) -> str:
        """``measured`` here; ``predicted`` from a measured profile; ``estimated`` from a roofline profile."""
        if self.measured is not None:
            return "measured"
        return "predicted" if self.plan.source == "measured" else "estimated"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FIT_FORMAT, "schema_version": SCHEMA_VERSION, "device": self.plan.device,
            "profile_source": self.plan.source, "figures": self.figures, "depth": self.depth,
            "precision": self.precision, "pick": self.pick.to_dict(), "out_dir": str(self.out_dir),
            "files": list(self.files),
            "measured": None if self.measured is None else asdict(self.measured),
            "steps": list(self.steps), "finetune": dict(self.finetune) if self.finetune else None,
            "measure_command": self.measure_command, "notes": list(self.notes), "plan": self.plan.to_dict(),
        }


def fit(
    budget: Budget,
    *,
    device: str | DeviceProfile,
    out_dir: str | os.PathLike[str],
    learngene: str = "demo",
    finetune_data: str | None = None,
    epochs: int = 5,
    margin: float = 0.0,
    max_depth: int = DEFAULT_MAX_DEPTH,
    precisions: Sequence[str] | None = None,
    objective: str = "deepest",
    accuracy: Mapping[int, float] | None = None,
    max_steps: int = MAX_STEPS,
    measure: bool = True,
    refresh_profile: bool = False,
    quiet: bool = True,
    log: Log | None = None,
) -> FitResult:
    """Run the whole job (module docstring); returns what was built and why. ``device`` is a profile
    name or path (``resolve_profile``) or a ``DeviceProfile``."""
    say = log or (lambda _msg: None)
    from tleg_deploy.model.resources import learngene_path, learngene_spec

    out = check_destination(out_dir, inputs=[learngene_path(learngene)])

    spec = learngene_spec(learngene)
    check_options(max_depth=max_depth, precisions=precisions, objective=objective, margin=margin, accuracy=accuracy)
    if isinstance(device, str):
        from tleg_deploy.profile.registry import resolve_profile

        profile = resolve_profile(device, spec=spec, refresh=refresh_profile, quiet=quiet)
    else:
        profile = device
    plan = solve(profile, budget, spec=spec, max_depth=max_depth, precisions=precisions, objective=objective,
                 margin=margin, accuracy=accuracy)
    say(f"solved on {profile.name} ({profile.source} profile): depth {plan.depth} {plan.precision} "
        f"({plan.binding} binds)")

    # -- torch from here on ---------------------------------------------------------------------
    from tleg_deploy.model.expansion import expand, save_descendant
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.profile.artifact import measure_onnx

    lg = load_learngene(learngene)
    runnable = measure and _runs_here(profile)
    notes = list(plan.warnings)
    if not runnable and profile.source == "measured":
        notes.append(f"{profile.name} cannot be run here: figures are predicted, not measured")
    staging = staging_dir(out)
    export = functools.partial(_export, lg=lg, learngene=learngene, precision=plan.precision, profile=profile,
                               out=staging, data=finetune_data or "digits", say=say)
    try:
        depth, measured, chosen = plan.depth, None, None
        steps: list[str] = []
        model = expand(lg, depth).eval()
        for _ in range(max_steps + 1):  # bounded: the measured check, stepping at most max_steps times
            if not runnable or budget.latency_ms is None:
                break
            _clear(staging)
            chosen = export(model, source="expand")
            measured = measure_onnx(staging / chosen, spec, depth=depth, precision=plan.precision,
                                    threads=_threads(profile))
            value = measured.at(budget.percentile)
            say(f"measured depth {depth}: {budget.percentile} {value:.3g} ms (budget {budget.latency_ms:g} ms)")
            if value <= budget.latency_ms:
                break
            if depth == 1 or len(steps) == max_steps:
                raise InfeasibleError(
                    f"depth {depth} {plan.precision} measured {budget.percentile} {value:.3g} ms over the "
                    f"{budget.latency_ms:g} ms budget after {len(steps)} step(s) shallower",
                    hint="the host profile may be stale or the machine busy: re-measure with --refresh-profile "
                         "or raise the budget")
            steps.append(f"depth {depth} measured {budget.percentile} {value:.3g} ms > {budget.latency_ms:g} ms: "
                         f"stepped to depth {depth - 1}")
            depth -= 1
            model = expand(lg, depth).eval()
        metrics = None
        if finetune_data is not None:  # exported once, trained: the expansion's export is only for timing
            model, metrics = _finetune(model, finetune_data, epochs, quiet, say)
            _clear(staging)
            chosen = export(model, source=f"finetune:{finetune_data}:{epochs}")
        elif chosen is None:
            chosen = export(model, source="expand")
        weights = f"model_d{depth}.safetensors"
        save_descendant(model, staging / weights, lg.sha256(), {
            "made_by": "tleg-deploy fit", "learngene": str(learngene), "device": profile.name,
            "budget": budget.to_dict(), "finetune": metrics})
        pick = plan.pick if depth == plan.depth else evaluate(
            profile, budget, spec=spec, depth=depth, precision=plan.precision, margin=margin, accuracy=accuracy)
        if measured is not None and measured.at(budget.percentile) < 0.5 * pick.latency_ms:
            notes.append(f"measured {budget.percentile} {measured.at(budget.percentile):.3g} ms is under half the "
                         f"predicted {pick.latency_ms:.3g} ms: the profile was probably taken under load; "
                         "re-measure with --refresh-profile for a deeper pick")
        result = FitResult(
            plan=plan, pick=pick, out_dir=out, files=(), measured=measured,
            steps=tuple(steps), finetune=metrics, measure_command=profile.measure_command, notes=tuple(notes))
        _write_outputs(staging, result, profile, chosen, weights)
        names = tuple(sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()))
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataclasses.replace(result, files=names)


# ---------------------------------------------------------------------------------------------
# Steps


def _runs_here(profile: DeviceProfile) -> bool:
    """A measured ONNX Runtime CPU profile of this very host: we can time the artifact ourselves."""
    if profile.source != "measured" or profile.backend != "onnxruntime" or profile.kind != "cpu":
        return False
    from tleg_deploy.profile.env import host_fingerprint

    return profile.host_fingerprint == host_fingerprint()


def _threads(profile: DeviceProfile) -> int:
    threads = profile.runtime.get("threads", 1)
    return threads if isinstance(threads, int) and threads > 0 else 1


def export_formats(precision: str, backend: str) -> tuple[str, ...]:
    """The ``export_family`` formats that give fp32 ONNX plus the chosen precision's variant: ORT's
    dynamic int8 on ONNX Runtime targets; for TensorRT, fp16 and the calibrated static (QDQ) int8
    with ``build_engine.sh`` (TensorRT cannot read dynamic quantization)."""
    if backend == "tensorrt" and precision != "fp32":
        return ("onnx", "tensorrt")
    return {"fp32": ("onnx",), "fp16": ("onnx", "fp16"), "int8": ("onnx", "int8")}[precision]


def _export(model: ViT, *, source: str, lg: Learngene, learngene: str, precision: str, profile: DeviceProfile,
            out: Path, data: str, say: Log) -> str:
    """Export and validate ``model`` as a one-member family in ``out`` (its ``manifest.json`` is the
    one format every export directory carries); returns the chosen precision's file, relative to ``out``."""
    from tleg_deploy.export.family import export_family
    from tleg_deploy.model.resources import learngene_path

    manifest = export_family(lg, [model.depth], out, export_formats(precision, profile.backend), data=data,
                             learngene_file=learngene_path(learngene), models={model.depth: model}, source=source,
                             profile=profile)
    wanted = "int8-qdq" if precision == "int8" and profile.backend == "tensorrt" else precision
    files = [a["file"] for a in manifest["artifacts"] if a["format"] == "onnx"]
    say(f"exported and validated depth {model.depth}: {', '.join(files)}")
    return next(a["file"] for a in manifest["artifacts"] if a["format"] == "onnx" and a["precision"] == wanted)


def _finetune(model: ViT, data: str, epochs: int, quiet: bool, say: Log) -> tuple[ViT, dict[str, Any]]:
    from tleg_deploy.train.finetune import finetune

    say(f"fine-tuning depth {model.depth} on {data} for {epochs} epoch(s)")
    res = finetune(model, data, epochs=epochs, quiet=quiet)
    return res.model.eval(), {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}


def _clear(d: Path) -> None:
    for f in d.iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()


def check_destination(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Where fit may write: a new or empty directory, or an earlier fit output (``plan.json`` of our
    format) holding only files fit writes; it never holds an input. Raises ``OutputError``."""
    return output_dir(out, inputs=inputs, ours=lambda d: has_marker(d, "plan.json", FIT_FORMAT), owns=_fit_owns,
                      whole=True)


_FIT_FILE = re.compile(r"plan\.json|manifest\.json|REPORT\.md|build_engine\.sh|timing\.cache|\.tleg-export\.lock"
                       r"|model_d\d+\.safetensors")


def _fit_owns(rel: str, is_dir: bool) -> bool:
    """A path (relative to a fit directory) that fit writes: its top-level files, ``depth_NN/`` and
    the member files export writes in there."""
    from tleg_deploy.export.family import is_member_file

    head, _, rest = rel.partition("/")
    if re.fullmatch(r"depth_\d+", head):
        return (is_dir and not rest) or (not is_dir and "/" not in rest and is_member_file(rest))
    return not is_dir and not rest and _FIT_FILE.fullmatch(head) is not None


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished directory in; an earlier fit output is replaced only once the new one is whole."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Outputs


def _write_outputs(d: Path, result: FitResult, profile: DeviceProfile, chosen: str, weights: str) -> None:
    """plan.json, REPORT.md and build_engine.sh next to the manifest ``export_family`` wrote."""
    from tleg_deploy.deploy.fit_report import build_engine_script, render_report

    write_text_atomic(d / "build_engine.sh", build_engine_script(profile, chosen, result.precision, result.plan.spec))
    with contextlib.suppress(OSError):
        os.chmod(d / "build_engine.sh", 0o755)
    write_json_atomic(d / "plan.json", {**result.to_dict(), "weights": {
        "file": weights, "bytes": (d / weights).stat().st_size, "sha256": sha256_file(d / weights)}})
    write_text_atomic(d / "REPORT.md", render_report(result, profile, chosen))
