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
leaves nothing half-written. Up to step 2 nothing imports torch (``fit --device jetson`` needs no
GPU; the solver and profile tables are torch-free).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tleg_deploy import costs
from tleg_deploy.config import ViTSpec
from tleg_deploy.errors import ExportError, FormatError, InfeasibleError
from tleg_deploy.fileio import sha256_file, write_json_atomic, write_text_atomic
from tleg_deploy.solve import DEFAULT_MAX_DEPTH, Budget, Candidate, Plan, evaluate, solve

if TYPE_CHECKING:
    from tleg_deploy.profile.table import DeviceProfile
    from tleg_deploy.vit import ViT

FIT_FORMAT = "tleg-fit"
MANIFEST_FORMAT = "tleg-manifest"
SCHEMA_VERSION = 1
MAX_STEPS = 3

Log = Callable[[str], None]


@dataclass(frozen=True)
class Measurement:
    """Latency of one exported artifact on this machine (ONNX Runtime, CPU)."""

    depth: int
    precision: str
    p50_ms: float
    p90_ms: float
    runs: int
    threads: int

    def at(self, percentile: str) -> float:
        return self.p90_ms if percentile == "p90" else self.p50_ms


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
            "measured": None if self.measured is None else self.measured.__dict__,
            "steps": list(self.steps), "finetune": dict(self.finetune) if self.finetune else None,
            "measure_command": self.measure_command, "notes": list(self.notes), "plan": self.plan.to_dict(),
        }


def learngene_spec(name_or_path: str) -> ViTSpec:
    """The spec of a learngene file, read from its safetensors header without importing torch."""
    from tleg_deploy.resources import learngene_path

    path = learngene_path(name_or_path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError(f"header size {size}")
            meta = json.loads(f.read(size)).get("__metadata__") or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"no such learngene file: {path}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != "tleg-learngene":
        raise FormatError(f"{path} has format {meta.get('format')!r}, expected 'tleg-learngene'",
                          hint="pass a learngene (tleg-deploy info FILE says what a file is)")
    return ViTSpec.from_json(meta["spec"])


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
    out = Path(out_dir)
    _check_destination(out)
    spec = learngene_spec(learngene)

    if isinstance(device, str):
        from tleg_deploy.profile.registry import resolve_profile

        say(f"resolving device profile {device!r}")
        profile = resolve_profile(device, spec=spec, refresh=refresh_profile, quiet=quiet)
    else:
        profile = device
    plan = solve(profile, budget, spec=spec, max_depth=max_depth, precisions=precisions, objective=objective,
                 margin=margin, accuracy=accuracy)
    say(f"solved: depth {plan.depth} {plan.precision} ({plan.binding} binds)")

    # -- torch from here on ---------------------------------------------------------------------
    from tleg_deploy.expand import expand, save_descendant
    from tleg_deploy.resources import load_learngene

    lg = load_learngene(learngene)
    runnable = measure and _runs_here(profile)
    notes = list(plan.warnings)
    if not runnable and profile.source == "measured":
        notes.append(f"{profile.name} cannot be run here: figures are predicted, not measured")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        depth, measured = plan.depth, None
        steps: list[str] = []
        model = expand(lg, depth).eval()
        export = functools.partial(_export, precision=plan.precision, out=staging, lg_sha=lg.sha256(), say=say,
                                   backend=profile.backend, data=finetune_data or "digits")
        files = export(model)
        for _ in range(max_steps + 1):  # bounded: the measured check, stepping at most max_steps times
            if not runnable or budget.latency_ms is None:
                break
            measured = measure_onnx(staging / files[plan.precision]["file"], spec, depth=depth,
                                    precision=plan.precision, threads=_threads(profile))
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
            _clear(staging)
            model = expand(lg, depth).eval()
            files = export(model)
        metrics = None
        if finetune_data is not None:
            model, metrics = _finetune(model, finetune_data, epochs, quiet, say)
            _clear(staging)
            files = export(model)
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
        _write_outputs(staging, result, profile, files, weights, lg.sha256(), budget)
        names = tuple(sorted(p.name for p in staging.iterdir()))
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return FitResult(**{**result.__dict__, "files": names})


def measure_onnx(path: str | os.PathLike[str], spec: ViTSpec, *, depth: int, precision: str, threads: int = 1,
                 batch: int = 1, rounds: int = 7, round_seconds: float = 0.15) -> Measurement:
    """Time one ONNX file on this CPU with the profiler's own protocol (``profile.measure``: fixed
    intra-op threads, spinning off, warm-up, several rounds), so measured and predicted agree in kind."""
    from tleg_deploy.profile.measure import MeasureConfig, OrtRunner, time_runners

    cfg = MeasureConfig(threads=threads, batch=batch, rounds=rounds, round_seconds=round_seconds, memory=False)
    stats = time_runners({depth: OrtRunner(Path(path), spec, batch, threads, "cpu")}, cfg)[depth]
    return Measurement(depth=depth, precision=precision, p50_ms=stats["p50"], p90_ms=stats["p90"],
                       runs=int(stats["n"]), threads=threads)


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


def _export(model: ViT, precision: str, out: Path, lg_sha: str, say: Log, *, backend: str,
            data: str) -> dict[str, dict[str, Any]]:
    """fp32 ONNX plus the chosen precision's variant, each validated against PyTorch. int8 is ORT's
    dynamic quantization, or static QDQ (calibrated on ``data``) for a TensorRT target."""
    from tleg_deploy.export.onnx import export_onnx

    depth = model.depth
    fp32 = out / f"model_d{depth}_fp32.onnx"
    export_onnx(model, fp32, metadata={"learngene_sha256": lg_sha})
    files: dict[str, dict[str, Any]] = {"fp32": {"file": fp32.name, "parity": _validate(fp32, model, "fp32")}}
    if precision != "fp32":
        from tleg_deploy.export.quantize import convert_fp16, quantize_int8

        variant = out / f"model_d{depth}_{precision}.onnx"
        images = None
        if precision == "fp16":
            convert_fp16(fp32, variant)
            check = "fp16"
        elif precision == "int8":
            images = _images(data, model.spec)
            qdq = backend == "tensorrt"
            quantize_int8(fp32, variant, mode="qdq" if qdq else "dynamic", calibration=images if qdq else None)
            check = "int8-qdq" if qdq else "int8"
        else:
            raise ExportError(f"cannot export precision {precision!r}")
        files[precision] = {"file": variant.name, "parity": _validate(variant, model, check, images, data)}
    say(f"exported and validated depth {depth}: {', '.join(f['file'] for f in files.values())}")
    return files


def _images(data: str, spec: ViTSpec) -> Any:
    """Real images for int8 calibration and the top-1 agreement check (the test split, 256 at most)."""
    from tleg_deploy.train.data import load_data

    return load_data(data, spec, "test")[0][:256]


def _validate(path: Path, model: ViT, precision: str, images: Any = None, data: str | None = None) -> dict[str, Any]:
    """Parity with PyTorch (raises ExportError past the tolerance); its report lands next to the file."""
    from tleg_deploy.export.validate import validate_onnx

    report = validate_onnx(path, model, precision=precision, images=images, data=data)
    return {"max_abs_diff": max(report.max_abs_diff.values(), default=0.0), "agreement": report.agreement,
            "check": precision}


def _finetune(model: ViT, data: str, epochs: int, quiet: bool, say: Log) -> tuple[ViT, dict[str, Any]]:
    from tleg_deploy.train.finetune import finetune

    say(f"fine-tuning depth {model.depth} on {data} for {epochs} epoch(s)")
    res = finetune(model, data, epochs=epochs, quiet=quiet)
    return res.model.eval(), {k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}


def _clear(d: Path) -> None:
    for f in d.iterdir():
        f.unlink()


def _check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _is_fit_output(out))):
        raise FileExistsError(f"{out} exists and is not an earlier fit output: choose another -o")


def _is_fit_output(out: Path) -> bool:
    try:
        return bool(json.loads((out / "plan.json").read_text()).get("format") == FIT_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


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


def _write_outputs(d: Path, result: FitResult, profile: DeviceProfile, files: Mapping[str, Mapping[str, Any]],
                   weights: str, lg_sha: str, budget: Budget) -> None:
    spec, depth = result.plan.spec, result.depth
    pred = profile.predict(depth, spec=spec, precision=result.precision)
    artifacts = [{"depth": depth, "precision": "fp32", "file": weights, "kind": "descendant-safetensors",
                  "bytes": (d / weights).stat().st_size, "sha256": sha256_file(d / weights),
                  "params": costs.params(spec, depth), "macs": costs.macs(spec, depth), "parity": None,
                  "predicted": None, "measured": None}]
    for precision, info in files.items():
        path = d / info["file"]
        chosen = precision == result.precision
        artifacts.append({
            "depth": depth, "precision": precision, "file": info["file"], "kind": "onnx",
            "bytes": path.stat().st_size, "sha256": sha256_file(path), "params": costs.params(spec, depth),
            "macs": costs.macs(spec, depth), "parity": info["parity"],
            "predicted": {"latency_p50_ms": pred.latency_p50_ms, "latency_p90_ms": pred.latency_p90_ms,
                          "latency_p90_upper_ms": pred.latency_p90_upper_ms, "memory_mb": pred.memory_mb,
                          "device": profile.name, "source": profile.source} if chosen else None,
            "measured": result.measured.__dict__ if chosen and result.measured is not None else None,
        })
    write_json_atomic(d / "manifest.json", {
        "format": MANIFEST_FORMAT, "schema_version": SCHEMA_VERSION, "learngene_sha256": lg_sha,
        "spec": spec.to_dict(), "spec_preset": spec.preset_name(), "device": profile.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "artifacts": artifacts,
    })
    chosen_file = files[result.precision]["file"]
    script = build_engine_script(profile, {p: f["file"] for p, f in files.items()}, result.precision, spec)
    write_text_atomic(d / "build_engine.sh", script)
    with contextlib.suppress(OSError):
        os.chmod(d / "build_engine.sh", 0o755)
    write_json_atomic(d / "plan.json", result.to_dict())
    write_text_atomic(d / "REPORT.md", render_report(result, profile, chosen_file, budget, pred))


def build_engine_script(profile: DeviceProfile, files: Mapping[str, str], precision: str, spec: ViTSpec) -> str:
    """The script to run on the target: TensorRT engine builds (``export.tensorrt.build_script``:
    trtexec + a Polygraphy check) for TensorRT targets; an ONNX Runtime timing run otherwise.
    ``files``: ONNX file per precision (``fp32`` and the chosen one)."""
    onnx_file = files[precision]
    if profile.backend == "tensorrt":
        from tleg_deploy.export.tensorrt import build_script

        trt_files = {("int8-qdq" if p == "int8" else p): f for p, f in files.items()}
        done = f"engines built; now replace the estimate with a measurement: {profile.measure_command}"
        return build_script(trt_files, spec) + f"echo {shlex.quote(done)}\n"
    head = ("#!/usr/bin/env bash\n"
            f"# Written by tleg-deploy fit for {profile.name} ({profile.backend}, {precision}). Run it on the device.\n"
            "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n")
    return head + (
        "PY=${PYTHON:-python3}\n"
        "\"$PY\" - <<'EOF'\nimport numpy as np, onnxruntime as ort, time\n"
        f"s = ort.InferenceSession('{onnx_file}', providers=['CPUExecutionProvider'])\n"
        f"x = np.zeros((1, {spec.in_chans}, {spec.img_size}, {spec.img_size}), np.float32)\n"
        "for _ in range(10): s.run(None, {'pixel_values': x})\n"
        "t = []\nfor _ in range(100):\n    t0 = time.perf_counter(); s.run(None, {'pixel_values': x})"
        "; t.append((time.perf_counter() - t0) * 1e3)\n"
        "print(f'p50 {np.percentile(t, 50):.3f} ms, p90 {np.percentile(t, 90):.3f} ms')\nEOF\n")


def render_report(result: FitResult, profile: DeviceProfile, chosen_file: str, budget: Budget, pred: Any) -> str:
    plan = result.plan
    pct = budget.percentile
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
        lines.append(f"- Fine-tuned: {', '.join(f'{k} {v}' for k, v in result.finetune.items())}")
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
    lines += ["", "## Candidates", "", f"| depth | precision | {pct} ms | upper ms | memory MB | params | fits |",
              "|---|---|---|---|---|---|---|"]
    for c in plan.candidates:
        key = (c.depth, c.precision)
        mark = "**pick**" if key == (result.depth, result.precision) else (
            "fits the prediction, measured over budget" if key == (plan.depth, plan.precision) else
            "yes" if c.fits else "no: " + "; ".join(c.violations))
        lines.append(f"| {c.depth} | {c.precision} | {c.latency_ms:.3g} | {c.latency_upper_ms:.3g} | "
                     f"{c.memory_upper_mb:.1f} | {c.params:,} | {mark} |")
    lines += ["", "## Next", ""]
    if profile.backend == "tensorrt":
        lines.append(f"On the {profile.name}: `bash build_engine.sh` (builds the TensorRT engine from "
                     f"`{chosen_file}`), then `{profile.measure_command}` to replace the estimate with a measurement.")
    else:
        lines.append(f"`bash build_engine.sh` times `{chosen_file}` with ONNX Runtime on the target; "
                     f"`{profile.measure_command}` re-measures the profile.")
    return "\n".join(lines) + "\n"
