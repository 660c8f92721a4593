"""Import a device kit's results (``tleg_deploy.profile.kit``) as a ``source: measured`` profile.

Before any number is used: every file ``kit.json`` lists must have its recorded sha256 (a changed
model measures something else), ``results/`` must be complete and carry this kit's ``kit_id``, and
every (precision, depth) must have finite, positive times. Statistics are computed here from the
raw per-round times (ONNX Runtime: ``kit_runner``'s JSON; TensorRT: each run's ``--exportTimes``
file, via ``tleg_deploy.profile.trtexec``) exactly as ``profile.timing`` computes them, and fitted
with the profiler's own model (``table.make_entry``: intercept + slope·depth, R², leave-one-out
error, 95% prediction interval). Any problem is one ``FormatError``; nothing is written here.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tleg_deploy.errors import FormatError
from tleg_deploy.files.fileio import sha256_file
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile import trtexec
from tleg_deploy.profile.kit import read_kit_json
from tleg_deploy.profile.linefit import fit_line
from tleg_deploy.profile.table import DeviceProfile, Entry, Point, make_entry
from tleg_deploy.profile.timing import percentile

QUIET_REL_FLOOR = 0.05   # as profile.measure: run-to-run drift one session cannot see
BUSY_REL_FLOOR = 0.10
BUSY_LOAD_PER_CORE = 0.5
MAX_ENV_CHARS = 4000


def verify_kit(kit_dir: Path) -> dict[str, Any]:
    """``kit.json`` once every file it lists is present and unchanged."""
    kit = read_kit_json(kit_dir)
    files = kit.get("files")
    if not isinstance(files, dict) or not files:
        raise FormatError(f"{kit_dir}/kit.json lists no files")
    for rel, digest in files.items():
        path = kit_dir / rel
        if ".." in Path(rel).parts or not path.is_file():
            raise FormatError(f"kit file {rel} is missing from {kit_dir}", hint="copy the whole kit directory back")
        if sha256_file(path) != digest:
            raise FormatError(f"kit file {rel} was changed after the kit was made (sha256 differs)",
                              hint="the results would not measure the kit's model; make a new kit")
    return kit


def import_kit(kit_dir: str | Path, *, name: str | None = None, aliases: Sequence[str] = ()) -> DeviceProfile:
    """The measured profile of a kit whose ``run.sh`` has run (``results/`` beside ``kit.json``)."""
    kit_path = Path(kit_dir)
    kit, repeats, memory, env, rejected = _read_results(kit_path)
    rounds = _pooled(repeats)
    spec = ViTSpec.from_dict(kit["spec"])
    if kit["backend"] == "onnxruntime":
        runtime = {"backend": "onnxruntime", "versions": env.get("libraries", {}), "threads": kit["threads"]}
    else:
        runtime = {"backend": "tensorrt", "versions": {"tensorrt": env.get("tensorrt", "unknown")},
                   "times": "trtexec --exportTimes computeMs (GPU compute)"}
    env["recorded"] = _recorded(kit_path / "results" / "env")
    load = env.get("load_average")
    cores: int = env["cores"] if isinstance(env.get("cores"), int) else 1
    busy = (isinstance(load, list) and bool(load) and isinstance(load[0], (int, float))
            and max(float(load[0]) - kit["threads"], 0.0) / max(cores, 1) > BUSY_LOAD_PER_CORE)
    entries = []
    for precision in kit["precisions"]:
        points = [_point(depth, rounds[(precision, depth)], memory[(precision, depth)]) for depth in kit["depths"]]
        basis: dict[str, Any] = {"kit": {"kit_id": kit["kit_id"], "protocol": kit["protocol"]}}
        if rejected.get(precision):
            basis["rejected_sessions"] = {"worst_p50_residual_rel": rejected[precision]}
        if busy:
            basis["busy"] = "the device was busy while measured (load average): latency intervals widened"
        entries.append(make_entry(spec, precision, kit["batch"], points, basis=basis,
                                  latency_rel_floor=BUSY_REL_FLOOR if busy else QUIET_REL_FLOOR))
    device = name or kit["device"]
    recorded = env["recorded"]
    kind = "jetson" if "board.txt" in recorded and "nv_tegra_release" in recorded["board.txt"] else (
        "gpu" if kit["backend"] == "tensorrt" else "cpu")
    hardware = {"cpu": {"value": env.get("cpu", "unknown"), "unit": "", "source": "device kit (results/)"}}
    if env.get("cores"):
        hardware["cores"] = {"value": env["cores"], "unit": "", "source": "device kit (os.cpu_count)"}
    command = (f"tleg-deploy kit --device {device} --backend {kit['backend']} --precision {','.join(kit['precisions'])}"
               f" --depths {','.join(map(str, kit['depths']))} --batch {kit['batch']} -o kit-{device}; sh run.sh on "
               f"the device; tleg-deploy profile --from-kit kit-{device} -o profiles/{device}.json")
    return DeviceProfile(
        name=device, aliases=tuple(aliases), source="measured", kind=kind, backend=kit["backend"],
        measure_command=command, entries=tuple(entries), hardware=hardware, runtime=runtime, environment=env,
        host_fingerprint=None, date=env.get("date") or dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        notes="measured on the device with a tleg-deploy kit" + ("; busy while measured" if busy else ""))


def kit_points(kit_dir: str | Path, *, check_files: bool = True) -> tuple[dict[str, Any], dict[tuple[str, int], Point]]:
    """``kit.json`` and the points its run measured, per (precision, depth), every repeat pooled, checked as
    ``import_kit`` checks them (what ``fit --ssh`` steps on). ``check_files=False`` skips the sha256 of the kit's
    files (not its results), for a kit whose files were checked already and have not left this process's hands."""
    kit, repeats, memory, _env, _rejected = _read_results(Path(kit_dir), check_files=check_files)
    return kit, {key: _point(key[1], r, memory[key]) for key, r in _pooled(repeats).items()}


def kit_readings(kit_dir: str | Path) -> tuple[dict[str, Any], dict[tuple[str, int], list[Point]]]:
    """``kit.json`` and, per (precision, depth), one point per repeat of the measurement, in the order they were
    made, checked as ``import_kit`` checks them (what ``fit --kit-results`` steps on: successive timings)."""
    kit, repeats, memory, _env, _rejected = _read_results(Path(kit_dir))
    return kit, {key: [_point(key[1], r, memory[key]) for r in reps] for key, reps in repeats.items()}


def _pooled(repeats: Repeats) -> Rounds:
    """Every repeat's rounds of each (precision, depth) as one list of rounds."""
    return {key: [r for rounds in reps for r in rounds] for key, reps in repeats.items()}


def _read_results(kit_path: Path, *, check_files: bool = True) -> tuple[dict[str, Any], Repeats,
                                                                       dict[tuple[str, int], float], dict[str, Any],
                                                                       dict[str, Any]]:
    """The verified kit, its per-round times of every repeat and memory per (precision, depth), environment and
    rejected sessions; raises ``FormatError`` for anything missing, truncated, tampered or another kit's."""
    kit = verify_kit(kit_path) if check_files else read_kit_json(kit_path)
    results = kit_path / "results"
    if not results.is_dir():
        hint = "the run did not finish; run sh run.sh again" if (kit_path / "results.partial").exists() else \
            "run sh run.sh on the device, then copy the kit directory (with results/) back"
        raise FormatError(f"{kit_path} has no results/", hint=hint)
    _check_kit_id(results, kit)
    if kit["backend"] == "onnxruntime":
        return (kit, *_ort_results(results, kit))
    if kit["backend"] == "tensorrt":
        return (kit, *_trt_results(results, kit), {})
    raise FormatError(f"kit backend {kit['backend']!r} is not one this tleg-deploy reads")


# ---------------------------------------------------------------------------------------------
# Per backend

Rounds = dict[tuple[str, int], list[list[float]]]  # (precision, depth) -> per-round times
Repeats = dict[tuple[str, int], list[list[list[float]]]]  # (precision, depth) -> per repeat, per-round times


def _repeats(kit: dict[str, Any]) -> int:
    """How many times the kit makes its whole measurement (kits made before repeats existed: once)."""
    n = kit["protocol"].get("repeats", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise FormatError(f"kit.json protocol.repeats is {n!r}, not a count", hint="make the kit again")
    return n


def _ort_results(results: Path, kit: dict[str, Any]) -> tuple[Repeats, dict[tuple[str, int], float],
                                                              dict[str, Any], dict[str, Any]]:
    path = results / "onnxruntime.json"
    if not path.is_file():
        raise FormatError(f"{path} is missing", hint="the run did not finish; run sh run.sh again")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is truncated or not JSON ({e})", hint="run sh run.sh again") from None
    if not isinstance(data, dict) or data.get("format") != "tleg-kit-results" or data.get("schema_version") != 1:
        raise FormatError(f"{path} is not a kit results file of schema 1")
    if data.get("kit_id") != kit["kit_id"]:
        raise FormatError(f"{path} belongs to another kit (kit_id {str(data.get('kit_id'))[:12]}…, this kit "
                          f"{kit['kit_id'][:12]}…)", hint="copy back the results of this kit's own run")
    n_repeats = _repeats(kit)
    found: dict[tuple[str, int, int], list[list[float]]] = {}
    memory: dict[tuple[str, int], float] = {}
    points = data.get("points")
    for i, p in enumerate(points if isinstance(points, list) else []):
        where = f"{path.name} points[{i}]"
        if not isinstance(p, dict):
            raise FormatError(f"{where} is not an object")
        key = (p.get("precision"), p.get("depth"))
        if key not in {(q, d) for q in kit["precisions"] for d in kit["depths"]}:
            raise FormatError(f"{where} is for {key[0]!r} depth {key[1]!r}, which this kit does not measure")
        repeat = p.get("repeat", 0)
        if repeat not in range(n_repeats) or isinstance(repeat, bool):
            raise FormatError(f"{where} is repeat {repeat!r}; this kit makes {n_repeats} (0-{n_repeats - 1})")
        if (*key, repeat) in found:
            raise FormatError(f"{where} repeats {key[0]} depth {key[1]}"
                              + (f" (repeat {repeat + 1} of {n_repeats})" if n_repeats > 1 else ""))
        found[(*key, repeat)] = _check_rounds(p.get("rounds"), where)  # type: ignore[index]
        if repeat:  # memory is probed in the first repeat only
            continue
        mem = p.get("memory_mb")
        if mem is None and not kit["protocol"].get("memory", True):
            from tleg_deploy.plan import costs

            mem = costs.artifact_bytes(ViTSpec.from_dict(kit["spec"]), int(p["depth"]), str(p["precision"])) / 1e6
        memory[key] = _value(mem, f"{where}.memory_mb")  # type: ignore[index]
    for precision in kit["precisions"]:
        for depth in kit["depths"]:
            for repeat in range(n_repeats):
                if (precision, depth, repeat) not in found:
                    raise FormatError(f"{path.name} has no times for {precision} depth {depth}"
                                      + (f" (repeat {repeat + 1} of {n_repeats})" if n_repeats > 1 else ""),
                                      hint="the run did not finish; run sh run.sh again")
    rounds: Repeats = {(q, d): [found[(q, d, r)] for r in range(n_repeats)] for q in kit["precisions"]
                       for d in kit["depths"]}
    raw_env, raw_rejected = data.get("environment"), data.get("rejected_sessions")
    env: dict[str, Any] = {**(raw_env if isinstance(raw_env, dict) else {}), "date": data.get("date")}
    rejected: dict[str, Any] = raw_rejected if isinstance(raw_rejected, dict) else {}
    return rounds, memory, env, rejected


def _trt_results(results: Path, kit: dict[str, Any]) -> tuple[Repeats, dict[tuple[str, int], float],
                                                              dict[str, Any]]:
    rounds: Repeats = {}
    memory: dict[tuple[str, int], float] = {}
    versions: set[str] = set()
    n_repeats = _repeats(kit)
    for a in kit["artifacts"]:
        key = (a["precision"], a["depth"])
        every = []
        rounds[key] = []
        for repeat in range(1, n_repeats + 1):  # run.sh names the first repeat's files without _s1
            runs = []
            for r in range(1, kit["protocol"]["rounds"] + 1):
                stem = f"{a['precision']}_d{a['depth']}" + (f"_s{repeat}" if repeat > 1 else "") + f"_r{r}"
                runs.append(trtexec.read_run(results / "trt" / f"{stem}.times.json", results / "trt" / f"{stem}.log"))
            rounds[key].append([list(run.times_ms) for run in runs])
            every += runs
        memory[key] = statistics.median(run.memory_mib for run in every) * trtexec.MIB / 1e6
        versions.update(run.version for run in every if run.version)
    if len(versions) > 1:
        raise FormatError(f"the results mix TensorRT versions {sorted(versions)}",
                          hint="run the kit again on one device")
    env: dict[str, Any] = {"tensorrt": next(iter(versions), "unknown")}
    smi = (results / "env" / "nvidia-smi.txt")
    if smi.is_file():
        rows = smi.read_text(errors="replace").splitlines()[1:2]
        if rows:
            env["gpu"] = rows[0].split(",")[0].strip()
            env["cpu"] = env["gpu"]
    return rounds, memory, env


def _check_kit_id(results: Path, kit: dict[str, Any]) -> None:
    path = results / "kit_id"
    found = path.read_text().strip() if path.is_file() else None
    if found is None:
        raise FormatError(f"{path} is missing: results/ is not a finished run", hint="run sh run.sh again")
    if found != kit["kit_id"]:
        raise FormatError(f"{results} belongs to another kit (kit_id {found[:12]}…, this kit {kit['kit_id'][:12]}…)",
                          hint="copy back the results of this kit's own run")


def _check_rounds(value: Any, where: str) -> list[list[float]]:
    if not isinstance(value, list) or not value or not all(isinstance(r, list) and r for r in value):
        raise FormatError(f"{where}.rounds must be a non-empty list of non-empty lists of times")
    out = []
    for j, r in enumerate(value):
        times = [_value(t, f"{where}.rounds[{j}]") for t in r]
        if min(times) <= 0:
            raise FormatError(f"{where}.rounds[{j}] holds a time <= 0")
        out.append(times)
    return out


def _value(v: Any, where: str) -> float:
    v = trtexec.number(v, where)
    if v < 0:
        raise FormatError(f"{where} is negative ({v!r})")
    return float(v)


def _point(depth: int, rounds: list[list[float]], memory_mb: float) -> Point:
    """The profiler's statistics (``profile.timing``) from per-round times."""
    xs = [t for r in rounds for t in r]
    p50s = [statistics.median(r) for r in rounds]
    p90s = [percentile(r, 0.9) for r in rounds]
    se = lambda v: statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0  # noqa: E731
    return Point(depth=depth, p50_ms=statistics.median(xs), p90_ms=percentile(xs, 0.9), p99_ms=percentile(xs, 0.99),
                 mean_ms=statistics.fmean(xs), std_ms=statistics.stdev(xs) if len(xs) > 1 else 0.0, n=len(xs),
                 rounds=len(rounds), p50_se_ms=se(p50s), p90_se_ms=se(p90s), memory_mb=memory_mb)


def _recorded(env_dir: Path) -> dict[str, str]:
    if not env_dir.is_dir():
        return {}
    return {p.name: p.read_text(errors="replace")[:MAX_ENV_CHARS] for p in sorted(env_dir.glob("*.txt"))}


def linearity(entry: Entry) -> float:
    """Worst relative residual of the p50 points from their line (for messages)."""
    return fit_line(list(entry.depths), [p.p50_ms for p in entry.points]).worst_residual_rel
