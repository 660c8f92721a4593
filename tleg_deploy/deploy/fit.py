"""``fit(FitRequest(budget, device=...))``: the main job, from a learngene to a deployable directory.

    1 resolve the device profile (``host`` is measured on first use); a      ``fit_profile``
      measured profile of this host is drift-probed (``profile.drift``)
    2 solve: the deepest (or most accurate) depth x precision that fits,      ``_solve``
      with confidence
    3 on a device we can run here (the profile was measured on this host with ``fit_measure``
      ONNX Runtime), time an export of the expansion (Xia et al., AAAI 2024); if it misses the
      latency budget, search shallower, else deeper while that still measures within budget and meets
      the other budgets, each next depth where the profile scaled by the last measured / predicted ratio
      says the boundary is (at most ``2 * max_steps`` measurements after the first; ``fit_measure``).
      With ``kit_results`` (``fit --kit-results DIR``) the device kit's measured profile is solved on
      and the depths its run recorded take the place of timing here; with ``ssh`` (``fit --ssh``) device
      kits run on the target over SSH measure the pick and each step (a device without a profile is
      profiled there first)
    4 fine-tune if data is given (latency does not depend on the weights, so  ``_finetune``
      this runs once, at the final depth, after the measured check)
    5 export the model that will be shipped to ONNX (fp32 + the chosen        ``_export``
      precision's variant) and validate it against PyTorch on the user's data (``calib_data``, else
      ``finetune_data``, else the data the learngene was trained on, else the bundled digits). A
      precision whose variant fails its check leaves the candidates, with the reason, and the
      solver picks again (``_build_with_fallback``; at most once per precision)
    6 write the directory: descendant weights, ONNX files, ``plan.json``,      ``_write_outputs``
      ``manifest.json``, ``labels.json`` (class names, preprocessing), ``build_engine.sh`` for the
      target and ``REPORT.md`` (with a "how to run this model" snippet)

The directory is built next to its destination and renamed into place at the end (``_staged``), so Ctrl-C
leaves nothing half-written. A re-run replaces an earlier fit output as a whole, so it refuses one
holding a file fit did not write (``check_destination``, the policy of ``files.outputs``). Up to
step 2 nothing imports torch (``fit --device jetson`` needs no GPU; the solver and profile tables
are torch-free) except the drift probe of this host's profile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tleg_deploy.deploy.fit_measure import (
    MIN_TIMINGS,
    THIN_REL,
    Timer,
    host_timer,
    kit_backend,
    kit_timer,
    measured_check,
    profile_threads,
    ssh_timer,
    thin_margin,
)
from tleg_deploy.deploy.fit_profile import resolve_device_profile, runs_here
from tleg_deploy.deploy.fit_report import build_engine_script, render_report
from tleg_deploy.deploy.fit_types import FIT_FORMAT, FitRequest, FitResult
from tleg_deploy.errors import ExportError, InfeasibleError, TlegError
from tleg_deploy.files.datacard import LABELS_NAME
from tleg_deploy.files.fileio import sha256_file, write_json_atomic, write_text_atomic
from tleg_deploy.files.outputs import has_marker, output_dir, staging_dir
from tleg_deploy.plan.precisions import ONNX_KINDS, PRECISIONS, deployed_kind, export_formats
from tleg_deploy.plan.solve import Plan, default_max_depth, depth_notes, evaluate, solve
from tleg_deploy.profile.artifact import Measurement

if TYPE_CHECKING:
    from tleg_deploy.files.datacard import DataCard
    from tleg_deploy.model.learngene import Learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.model.vit import ViT
    from tleg_deploy.profile.table import DeviceProfile

Log = Callable[[str], None]


@dataclass(frozen=True)
class _Built:
    """What steps 3-5 made: the model at its final depth, its exported file and how it was checked."""

    model: ViT
    chosen: str                              # the chosen precision's ONNX file, relative to the directory
    measured: Measurement | None
    steps: tuple[str, ...]
    finetune: dict[str, Any] | None
    over_budget: dict[int, float] = dataclasses.field(default_factory=dict)  # depth -> measured ms over the limit


def fit(request: FitRequest, *, quiet: bool = True, log: Log | None = None) -> FitResult:
    """Run the whole job (module docstring); returns what was built and why. With ``--ssh`` every device
    kit of the job (a new device's profile, the measured steps) goes over one SSH connection."""
    from tleg_deploy.profile.remote import connected

    say = log or (lambda _msg: None)
    with connected(request.ssh, say) as ssh:
        return _fit(dataclasses.replace(request, ssh=ssh) if ssh is not request.ssh else request, quiet, say)


def _fit(request: FitRequest, quiet: bool, say: Log) -> FitResult:
    from tleg_deploy.model.resources import learngene_aux_depth, learngene_path, learngene_spec

    check_destination(request.out_dir, inputs=[learngene_path(request.learngene)])

    spec = learngene_spec(request.learngene)
    aux_depth = learngene_aux_depth(request.learngene)
    profile = resolve_device_profile(request, spec, quiet, say)
    plan = _solve(request, profile, spec, aux_depth, say)

    # -- torch from here on ---------------------------------------------------------------------
    from tleg_deploy.model.resources import load_learngene

    lg = load_learngene(request.learngene)
    extra: list[str] = []
    if request.finetune_data is not None:  # refuses data the learngene's spec cannot take; says a resize
        from tleg_deploy.train.data import check_data

        extra += check_data(request.finetune_data, spec)
        for note in extra:
            say(note)
    card = _card(request, lg)
    with _staged(request.out_dir) as staging:
        plan, built, rejected = _build_with_fallback(request, plan, profile, lg, card, staging, quiet, say, aux_depth)
        extra += depth_notes(built.model.depth, aux_depth, request.search.accuracy)
        result = dataclasses.replace(_result(request, plan, profile, built), rejected=rejected)
        result = dataclasses.replace(result, notes=(*result.notes, *extra))
        _write_outputs(staging, result, profile, built, lg, request, card)
        files = tuple(sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()))
    return dataclasses.replace(result, files=files)


def fit_kit(request: FitRequest, kit_dir: str | os.PathLike[str], *, repeats: int | None = None, force: bool = False,
            log: Log | None = None) -> tuple[Plan, Path]:
    """Steps 1-2, then a device kit instead of the build (``fit --kit DIR``), for a device that cannot be
    reached from here: the kit measures the planned depth and ``request.max_steps`` depths either side at the
    plan's precision on the profile's backend, ``repeats`` times over (default 1 + ``MIN_TIMINGS``: a reading near
    the budget is decided on the later ones). Run its ``run.sh`` on the device, then ``fit --kit-results DIR``
    solves on what it measured and steps on those depths. Returns the plan and the kit directory."""
    say = log or (lambda _msg: None)
    from tleg_deploy.model.resources import learngene_aux_depth, learngene_spec, load_learngene
    from tleg_deploy.profile.kit import KitConfig, build_kit, check_kit_destination

    if request.kit_results is not None or request.ssh is not None:
        raise TlegError("--kit writes a kit for a later run; it goes without --kit-results and --ssh")
    check_kit_destination(kit_dir, force=force)  # before a profile is measured or a model exported
    spec = learngene_spec(request.learngene)
    profile = resolve_device_profile(request, spec, True, say)
    plan = _solve(request, profile, spec, learngene_aux_depth(request.learngene), say)
    backend = kit_backend(profile)
    n = max(request.max_steps, 1)
    depths = tuple(range(max(1, plan.depth - n), plan.depth + n + 1))
    cfg = KitConfig.for_backend(Path(plan.device).stem, backend, (plan.precision,), depths,
                                threads=profile_threads(profile),
                                repeats=1 + MIN_TIMINGS if repeats is None else repeats)
    say(f"writing the {backend} kit for depths {depths[0]}-{depths[-1]} {plan.precision} to {kit_dir} ...")
    return plan, build_kit(spec, cfg, kit_dir, learngene=load_learngene(request.learngene), force=force)


# ---------------------------------------------------------------------------------------------
# Steps 1-2: torch-free


def _solve(request: FitRequest, profile: DeviceProfile, spec: ViTSpec, aux_depth: int, say: Log,
           rejected: dict[str, str] | None = None) -> Plan:
    """The solver's pick, over the precisions asked for less those ``rejected`` (precision -> why)."""
    s = request.search
    max_depth = s.max_depth if s.max_depth is not None else default_max_depth(aux_depth, s.accuracy)
    wanted = s.precisions
    if rejected:
        wanted = tuple(p for p in (s.precisions or profile.precisions(spec)) if p not in rejected)
        if not wanted:
            raise InfeasibleError("every precision failed its validation: " + "; ".join(rejected.values()),
                                  hint="validate on other data with --calib-data, or fine-tune with --finetune-data")
    try:
        plan = solve(profile, request.budget, spec=spec, max_depth=max_depth, precisions=wanted,
                     objective=s.objective, margin=s.margin, accuracy=s.accuracy)
    except InfeasibleError as e:
        if not rejected:
            raise
        raise InfeasibleError(f"{e.message} (after {'; '.join(rejected.values())})", hint=e.hint) from None
    say(f"solved on {profile.name} ({profile.source} profile): depth {plan.depth} {plan.precision} "
        f"({plan.binding} binds)")
    return plan


# ---------------------------------------------------------------------------------------------
# Steps 3-5: check, fine-tune, export and validate


def _card(request: FitRequest, lg: Learngene) -> DataCard | None:
    """Class names and preprocessing of what will be shipped: the fine-tuning data's, else the learngene's."""
    if request.finetune_data is None:
        return lg.data
    from tleg_deploy.train.data import data_card

    return data_card(request.finetune_data, lg.spec)


def _validation_data(request: FitRequest, card: DataCard | None) -> str:
    """The images quantized variants are validated (and int8 calibrated) on: the user's, when there are any."""
    if request.calib_data or request.finetune_data:
        return request.calib_data or request.finetune_data or "digits"
    source = card.source if card is not None else ""
    kind, _, arg = source.partition(":")
    if (kind == "folder" and Path(arg).is_dir()) or (kind == "npz" and Path(arg).is_file()):
        return source  # the data the learngene was trained on, still here
    return "digits"


def _build_with_fallback(request: FitRequest, plan: Plan, profile: DeviceProfile, lg: Learngene,
                         card: DataCard | None, staging: Path, quiet: bool,
                         say: Log, aux_depth: int) -> tuple[Plan, _Built, dict[str, str]]:
    """``_build`` the plan; when the chosen precision's variant fails its validation, reject that precision
    (saying why) and solve again without it, at most once per precision."""
    rejected: dict[str, str] = {}
    trained: dict[int, tuple[ViT, dict[str, Any]]] = {}
    for _ in range(len(PRECISIONS)):
        try:
            built = _build(request, plan, profile, lg, card, staging, quiet, say, trained, frozenset(rejected))
            return plan, built, rejected
        except ExportError as e:
            failed = _failed_precision(e)
            if failed is None or failed == "fp32" or failed in rejected:
                raise
            rejected[failed] = f"{failed} rejected: {e.message}"
            say(f"{rejected[failed]}; solving again without {failed}")
            plan = _solve(request, profile, plan.spec, aux_depth, say, rejected)
    raise InfeasibleError("no precision passed its validation: " + "; ".join(rejected.values()))


def _failed_precision(e: ExportError) -> str | None:
    """The precision of the variant whose validation raised ``e`` (``model_int8.onnx failed validation``)."""
    m = re.match(r"(\S+\.onnx) failed validation", e.message)
    kind = next((k for k in ONNX_KINDS.values() if m and k.file_name == m.group(1)), None)
    return kind.precision if kind is not None else None


def _build(request: FitRequest, plan: Plan, profile: DeviceProfile, lg: Learngene, card: DataCard | None,
           staging: Path, quiet: bool, say: Log, trained: dict[int, tuple[ViT, dict[str, Any]]],
           skip: frozenset[str] = frozenset()) -> _Built:
    """Check the planned depth where it can be measured here (stepping shallower), fine-tune if asked
    (once per depth: ``trained`` keeps it across re-picks), then export and validate the model that will
    be shipped; the staging directory ends up holding that export."""
    from tleg_deploy.model.expansion import expand

    limit = request.budget.latency_ms
    depth, measured = plan.depth, None
    steps: list[str] = []
    over: dict[int, float] = {}
    with contextlib.ExitStack() as kits:  # device kits left on the target for the search, removed after it
        timer = _timer(request, plan, profile, lg, staging, say, kits)
        if timer is not None and limit is not None:
            depth, measured, steps, over = measured_check(request, plan, profile, limit, timer, say)
    metrics: dict[str, Any] | None = None
    if request.finetune_data is not None:
        if depth not in trained:
            trained[depth] = _finetune(expand(lg, depth), request.finetune_data, request.epochs, quiet, say)
        model, metrics = trained[depth]
        source = f"finetune:{request.finetune_data}:{request.epochs}"
    else:
        model, source = expand(lg, depth).eval(), "expand"
    _clear(staging)
    chosen = _export(model, source=source, lg=lg, learngene=request.learngene, precision=plan.precision,
                     profile=profile, out=staging, data=_validation_data(request, card), card=card, skip=skip,
                     say=say)
    return _Built(model, chosen, measured, tuple(steps), metrics, over)


def _timer(request: FitRequest, plan: Plan, profile: DeviceProfile, lg: Learngene, staging: Path,
           say: Log, kits: contextlib.ExitStack) -> Timer | None:
    """Where the pick's latency is measured: the device kit's recorded run (``kit_results``), on the target over
    SSH (its kits stay there until ``kits`` closes), else here when the profile was measured on this host
    (timing files in ``staging/.timing``, cleared before the export)."""
    if not request.measure:
        return None
    if request.kit_results is not None:
        return kit_timer(request.kit_results, plan, say)
    if request.ssh is not None:
        return ssh_timer(lg, plan, profile, request.ssh, say, kits)
    return host_timer(lg, plan, profile, staging / ".timing", say) if runs_here(profile) else None


def _export(model: ViT, *, source: str, lg: Learngene, learngene: str, precision: str, profile: DeviceProfile,
            out: Path, data: str, card: DataCard | None, skip: frozenset[str], say: Log) -> str:
    """Export and validate ``model`` as a one-member family in ``out`` (its ``manifest.json`` is the
    one format every export directory carries); returns the chosen precision's file, relative to ``out``."""
    from tleg_deploy.export.family import export_family
    from tleg_deploy.export.manifest import LOCK_NAME
    from tleg_deploy.model.resources import learngene_path

    formats = export_formats(precision, profile.backend)
    say(f"exporting depth {model.depth} ({', '.join(formats)}) and validating on {data} ...")
    manifest = export_family(lg, [model.depth], out, formats, data=data,
                             learngene_file=learngene_path(learngene), models={model.depth: model}, source=source,
                             profile=profile, card=card, skip_precisions=skip)
    (out / LOCK_NAME).unlink(missing_ok=True)  # released; ``out`` is fit's private staging directory
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
    if request.kit_results is not None:
        notes.append(f"measured on {profile.name} by the device kit run in {request.kit_results}"
                     if built.measured is not None else
                     f"the kit in {request.kit_results} did not measure depth {depth} {plan.precision}: "
                     f"figures are predicted from its profile; to measure depth {depth}, keep that profile "
                     f"(tleg-deploy profile --from-kit {request.kit_results} -o profiles/{profile.name}.json) and "
                     f"write a kit around the pick from it (fit --device profiles/{profile.name}.json ... "
                     "--kit NEW_DIR)")
    elif request.ssh is not None:
        if built.measured is not None:
            notes.append(f"measured on {profile.name} at {request.ssh.describe()} with device kits run over SSH")
    elif not (request.measure and runs_here(profile)) and profile.source == "measured":
        notes.append(f"{profile.name} cannot be run here: figures are predicted, not measured")
    measured = built.measured
    if measured is not None and budget.latency_ms is not None and \
            thin_margin(measured.at(budget.percentile), budget.latency_ms):
        notes.append(f"measured {budget.percentile} {measured.at(budget.percentile):.3g} ms is within "
                     f"{THIN_REL:.0%} of the {budget.latency_ms:g} ms budget, less than a latency moves from one "
                     "minute to the next on a shared machine: another run may read it over; for headroom, fit "
                     "with a lower budget")
    if measured is not None and measured.at(budget.percentile) < 0.5 * pick.latency_ms:
        notes.append(f"measured {budget.percentile} {measured.at(budget.percentile):.3g} ms is under half the "
                     f"predicted {pick.latency_ms:.3g} ms: the profile was probably taken under load; "
                     "re-measure with --refresh-profile for a deeper pick")
    return FitResult(plan=plan, pick=pick, out_dir=request.out_dir, files=(), measured=measured, steps=built.steps,
                     finetune=built.finetune, measure_command=profile.measure_command, notes=tuple(notes),
                     over_budget=dict(built.over_budget),
                     kit_results=None if request.kit_results is None else str(request.kit_results),
                     ssh=None if request.ssh is None else request.ssh.describe())


def _write_outputs(d: Path, result: FitResult, profile: DeviceProfile, built: _Built, lg: Learngene,
                   request: FitRequest, card: DataCard | None) -> None:
    """The descendant's weights, build_engine.sh, plan.json and REPORT.md next to the manifest, ONNX
    files and ``labels.json`` that ``export_family`` wrote."""
    from tleg_deploy.model.expansion import save_descendant

    weights = f"model_d{result.depth}.safetensors"
    save_descendant(built.model, d / weights, lg.sha256(), {
        "made_by": "tleg-deploy fit", "learngene": str(request.learngene), "device": profile.name,
        "budget": request.budget.to_dict(), "finetune": built.finetune}, data=card)
    write_text_atomic(d / "build_engine.sh", build_engine_script(profile, built.chosen, result.precision,
                                                                 result.plan.spec))
    with contextlib.suppress(OSError):
        os.chmod(d / "build_engine.sh", 0o755)
    write_json_atomic(d / "plan.json", {**result.to_dict(), "weights": {
        "file": weights, "bytes": (d / weights).stat().st_size, "sha256": sha256_file(d / weights)}})
    labels = json.loads((d / LABELS_NAME).read_text())
    write_text_atomic(d / "REPORT.md", render_report(result, profile, built.chosen, labels))


# ---------------------------------------------------------------------------------------------
# Where the directory goes


def check_destination(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
    """Where fit may write: a new or empty directory, or an earlier fit output (``plan.json`` of our
    format) holding only files fit writes; it never holds an input. Raises ``OutputError``."""
    return output_dir(out, inputs=inputs, ours=lambda d: has_marker(d, "plan.json", FIT_FORMAT), owns=_fit_owns,
                      whole=True)


_FIT_FILE = re.compile(r"plan\.json|manifest\.json|labels\.json|REPORT\.md|build_engine\.sh|timing\.cache"
                       r"|\.tleg-export\.lock|model_d\d+\.safetensors")


def _fit_owns(rel: str, is_dir: bool) -> bool:
    """A path (relative to a fit directory) that fit writes: its top-level files, ``depth_NN/`` and
    the member files export writes in there."""
    from tleg_deploy.export.member import is_member_file

    head, _, rest = rel.partition("/")
    if re.fullmatch(r"depth_\d+", head):
        return (is_dir and not rest) or (not is_dir and "/" not in rest and is_member_file(rest))
    return not is_dir and not rest and _FIT_FILE.fullmatch(head) is not None


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
    """A fresh directory next to ``out`` to build in. Swapped into place when the block ends (an earlier
    fit output is replaced only once the new one is whole); removed if it raises (Ctrl-C included)."""
    staging = staging_dir(out)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            check_destination(out)  # again: a file a user put there during a long fit is not ours to delete
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(staging, out)
    except BaseException:  # refused or interrupted between the renames: the earlier output goes back
        if old is not None and not out.exists():
            os.replace(old, out)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
