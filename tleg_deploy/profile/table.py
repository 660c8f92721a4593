"""A device profile: per-architecture cost tables fitted as ``intercept + slope·depth``.

Every block of a ViT has one shape, so latency and peak memory grow linearly with depth on a fixed
(device, backend, precision, batch, architecture). A profile stores the measured (or roofline-
estimated) points and the least-squares line through them with its diagnostics: R², the worst
residual, the leave-one-out error, and what a 95% prediction interval needs. The tables idea
follows once-for-all's per-device latency tables (Cai et al., ICLR 2020); the interval is the
textbook one for a new observation from a simple regression,

    ŷ(x) ± t · s · sqrt(1 + 1/n + (x - x̄)² / Sxx)

with ``s`` pooled from the fit residuals and the measurement noise (so three nearly collinear
points do not claim a zero-width interval), and a relative floor for run-to-run drift (measured)
or model error (estimated), which grows with the distance outside the measured depths. There
``predict`` also says it is extrapolating. A measured profile also records its drift probe's
reference (``drift.ProbeInfo``): the machine's own variation over the profiling time is added to
every latency interval in quadrature, and a probe reading taken before use (``drift.probe``,
``profile.drift``) rescales the latency predictions when this host has drifted.

JSON format (DESIGN.md §4): ``format="tleg-device-profile"``, ``schema_version``; unknown
versions and missing or extra keys are rejected with an error naming the key. The stored fit is
re-derived from the stored points on load, so an edited number is caught. Torch-free.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tleg_deploy.errors import DeviceError, FormatError, SpecError, TlegError
from tleg_deploy.files import schema
from tleg_deploy.files.fileio import write_json_atomic
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.plan.precisions import PRECISIONS
from tleg_deploy.profile.drift import DriftReading, ProbeInfo, latency_terms
from tleg_deploy.profile.linefit import FIT_KEYS, LinearFit, fit_line

PROFILE_FORMAT = "tleg-device-profile"
SCHEMA_VERSION = 2  # 2: "probe" (drift probe reference, profile.drift); version 1 files load (no probe)
READABLE_VERSIONS = (1, 2)
BACKENDS = ("onnxruntime", "torch", "tensorrt")
SOURCES = ("measured", "estimated")
KINDS = ("cpu", "gpu", "jetson")

# ---------------------------------------------------------------------------------------------
# Points, entries, predictions


@dataclass(frozen=True)
class Point:
    """One measured (or estimated) depth. Latencies in ms; ``*_se_ms`` is the standard error of that
    statistic across interleaved rounds; memory in MB (1e6 bytes)."""

    depth: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    n: int
    rounds: int
    p50_se_ms: float
    p90_se_ms: float
    memory_mb: float

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _POINT_KEYS}


_POINT_KEYS = tuple(Point.__dataclass_fields__)


@dataclass(frozen=True)
class EntryFit:
    latency_p50: LinearFit
    latency_p90: LinearFit
    memory: LinearFit


@dataclass(frozen=True)
class Entry:
    """Costs of one (architecture, precision, batch) on the profile's device and backend."""

    spec: ViTSpec
    precision: str
    batch: int
    points: tuple[Point, ...]
    fit: EntryFit
    basis: Mapping[str, Any] | None = None  # how an estimate was made (MACs, bytes, efficiency, sources)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(p.depth for p in self.points)


def make_entry(
    spec: ViTSpec, precision: str, batch: int, points: Sequence[Point], *, latency_rel_floor: float = 0.03,
    memory_rel_floor: float = 0.05, basis: Mapping[str, Any] | None = None,
) -> Entry:
    """Fit latency p50, p90 and memory lines through ``points`` (sorted by depth)."""
    _check_precision(precision)
    pts = tuple(sorted(points, key=lambda p: p.depth))
    depths = [p.depth for p in pts]
    dof = float(sum(max(p.rounds - 1, 0) for p in pts))

    def noise(attr: str) -> float:
        return math.sqrt(sum(getattr(p, attr) ** 2 for p in pts) / len(pts))

    fit = EntryFit(
        latency_p50=fit_line(depths, [p.p50_ms for p in pts], noise_std=noise("p50_se_ms"), noise_dof=dof,
                             rel_floor=latency_rel_floor),
        latency_p90=fit_line(depths, [p.p90_ms for p in pts], noise_std=noise("p90_se_ms"), noise_dof=dof,
                             rel_floor=latency_rel_floor),
        memory=fit_line(depths, [p.memory_mb for p in pts], rel_floor=memory_rel_floor),
    )
    return Entry(spec=spec, precision=precision, batch=batch, points=pts, fit=fit,
                 basis=dict(basis) if basis is not None else None)


@dataclass(frozen=True)
class Prediction:
    depth: int
    precision: str                 # "fp32" | "fp16" | "int8"
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p50_upper_ms: float    # upper end of the (95%) prediction interval for p50
    latency_p90_upper_ms: float    # upper end of the (95%) prediction interval for p90
    memory_mb: float               # predicted peak memory (MB = 1e6 bytes)
    memory_upper_mb: float
    extrapolated: bool             # depth outside the measured depth range
    source: str                    # "measured" | "estimated"


# ---------------------------------------------------------------------------------------------
# The profile


@dataclass(frozen=True)
class DeviceProfile:
    """A device's cost model for one backend: entries per (architecture, precision, batch)."""

    name: str
    source: str
    kind: str
    backend: str
    measure_command: str
    entries: tuple[Entry, ...]
    aliases: tuple[str, ...] = ()
    hardware: Mapping[str, Any] = field(default_factory=dict)   # facts: {key: {value, unit, source}}
    runtime: Mapping[str, Any] = field(default_factory=dict)    # threads, versions, providers, options
    environment: Mapping[str, Any] = field(default_factory=dict)
    host_fingerprint: str | None = None
    date: str = ""
    notes: str = ""
    probe: ProbeInfo | None = None     # the drift probe's reference point (measured profiles, schema 2)
    drift: DriftReading | None = field(default=None, compare=False)  # this use's probe reading, not stored

    def __post_init__(self) -> None:
        where = f"profile {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise FormatError("profile field 'device.name' must be a non-empty string")
        _check_choice(self.source, SOURCES, f"{where}: field 'source'")
        _check_choice(self.kind, KINDS, f"{where}: field 'device.kind'")
        _check_choice(self.backend, BACKENDS, f"{where}: field 'runtime.backend'")
        seen: set[tuple[ViTSpec, str, int]] = set()
        for e in self.entries:
            key = (e.spec, e.precision, e.batch)
            if key in seen:
                raise FormatError(f"{where} has two entries for precision {e.precision}, batch {e.batch} "
                                  "of the same spec")
            seen.add(key)
        for i, e in enumerate(self.entries):
            _check_rising(e, f"{where} entries[{i}]", self.measure_command)

    # -- queries -------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def specs(self) -> tuple[ViTSpec, ...]:
        return tuple(dict.fromkeys(e.spec for e in self.entries))

    def precisions(self, spec: ViTSpec, batch: int = 1) -> tuple[str, ...]:
        """Precisions this profile has for that architecture and batch (empty if none)."""
        have = {e.precision for e in self.entries if e.spec == spec and e.batch == batch}
        return tuple(p for p in PRECISIONS if p in have)

    def entry(self, spec: ViTSpec, precision: str, batch: int = 1) -> Entry:
        for e in self.entries:
            if e.spec == spec and e.precision == precision and e.batch == batch:
                return e
        have = self.precisions(spec, batch)
        spec_name = spec.preset_name() or "this spec"
        if have:
            hint = f"it has {', '.join(have)} for {spec_name} at batch {batch}"
        elif any(e.spec == spec for e in self.entries):
            hint = f"it has batch {sorted({e.batch for e in self.entries if e.spec == spec})} for {spec_name}"
        else:
            known = sorted({s.preset_name() or "custom" for s in self.specs()})
            hint = f"it covers specs {', '.join(known) or '(none)'}; measure yours: {self.measure_command}"
        raise DeviceError(f"profile {self.name!r} has no {precision} entry for {spec_name} at batch {batch}",
                          hint=hint)

    def predict(self, depth: int, *, spec: ViTSpec, precision: str, batch: int = 1) -> Prediction:
        """Latency (p50, p90) and peak memory of a depth-``depth`` model, with 95% upper bounds. Latencies
        are rescaled by the drift probe's reading and their interval widened by the machine's variation
        over time (``drift.latency_terms``)."""
        check_depth(depth)
        e = self.entry(spec, precision, batch)
        f = e.fit
        scale, extra = latency_terms(self.probe, self.drift)

        def latency(line: LinearFit) -> tuple[float, float]:
            value = max(line.value(depth), 0.0) * scale
            return value, value + math.hypot(line.half_width(depth) * scale, extra * value)

        (p50, p50_up), (p90, p90_up) = latency(f.latency_p50), latency(f.latency_p90)
        return Prediction(
            depth=depth, precision=precision, latency_p50_ms=p50, latency_p90_ms=p90,
            latency_p50_upper_ms=p50_up, latency_p90_upper_ms=p90_up,
            memory_mb=max(f.memory.value(depth), 0.0),
            memory_upper_mb=max(f.memory.upper(depth), 0.0),
            extrapolated=not (f.latency_p50.depth_min <= depth <= f.latency_p50.depth_max),
            source=self.source,
        )

    def monotone_from(self, spec: ViTSpec, precision: str, batch: int = 1) -> int:
        """The depth from which every predicted cost and upper bound is non-decreasing in depth."""
        f = self.entry(spec, precision, batch).fit
        start = max(f.latency_p50.nondecreasing_from(), f.latency_p90.nondecreasing_from(),
                    f.memory.nondecreasing_from())
        return math.ceil(start) if math.isfinite(start) else MAX_DEPTH + 1

    def with_entries(self, entries: Sequence[Entry]) -> DeviceProfile:
        """A copy whose entries for the same (spec, precision, batch) are replaced by ``entries``."""
        keys = {(e.spec, e.precision, e.batch) for e in entries}
        kept = tuple(e for e in self.entries if (e.spec, e.precision, e.batch) not in keys)
        return replace(self, entries=kept + tuple(entries))

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "device": {"name": self.name, "aliases": list(self.aliases), "kind": self.kind,
                       "hardware": dict(self.hardware)},
            "source": self.source,
            "measure_command": self.measure_command,
            "runtime": {"backend": self.backend, **{k: v for k, v in self.runtime.items() if k != "backend"}},
            "environment": dict(self.environment),
            "host_fingerprint": self.host_fingerprint,
            "date": self.date,
            "notes": self.notes,
            "entries": [_entry_to_dict(e) for e in self.entries],
            "probe": self.probe.to_dict() if self.probe is not None else None,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file + rename)."""
        write_json_atomic(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DeviceProfile:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DeviceError(f"profile file {str(p)!r} does not exist") from None
        except UnicodeDecodeError:
            raise FormatError(f"{p}: not a text (JSON) file") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FormatError(f"{p}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except TlegError as e:
            raise FormatError(f"{p}: {e.message}", hint=e.hint) from None

    @classmethod
    def from_dict(cls, data: Any) -> DeviceProfile:
        version = data.get("schema_version") if isinstance(data, dict) else None
        schema.header(data, "a profile", PROFILE_FORMAT, version if version in READABLE_VERSIONS else SCHEMA_VERSION,
                      hint="upgrade tleg-deploy or re-measure the profile")
        top = _obj(data, "profile", {"format", "schema_version", "device", "source", "measure_command", "runtime",
                                     "environment", "host_fingerprint", "date", "notes", "entries"}
                   | ({"probe"} if version == 2 else set()))
        probe = ProbeInfo.from_dict(top["probe"]) if top.get("probe") is not None else None
        dev = _obj(top["device"], "device", {"name", "aliases", "kind", "hardware"})
        aliases = _list(dev["aliases"], "device.aliases")
        for i, a in enumerate(aliases):
            _str(a, f"device.aliases[{i}]")
        hardware = _obj(dev["hardware"], "device.hardware", None)
        for key, fact in hardware.items():
            f = _obj(fact, f"device.hardware.{key}", {"value", "unit", "source"})
            _str(f["source"], f"device.hardware.{key}.source", nonempty=True)
        runtime = _obj(top["runtime"], "runtime", None)
        if "backend" not in runtime:
            raise FormatError("field 'runtime.backend' is missing")
        fp = top["host_fingerprint"]
        if fp is not None:
            _str(fp, "host_fingerprint")
        entries = tuple(_entry_from_dict(e, f"entries[{i}]")
                        for i, e in enumerate(_list(top["entries"], "entries")))
        return cls(
            name=_str(dev["name"], "device.name", nonempty=True), aliases=tuple(aliases),
            kind=_str(dev["kind"], "device.kind"), hardware=hardware,
            source=_str(top["source"], "source"), backend=_str(runtime["backend"], "runtime.backend"),
            measure_command=_str(top["measure_command"], "measure_command"),
            runtime={k: v for k, v in runtime.items() if k != "backend"},
            environment=_obj(top["environment"], "environment", None), host_fingerprint=fp,
            date=_str(top["date"], "date"), notes=_str(top["notes"], "notes"), entries=entries, probe=probe,
        )


# ---------------------------------------------------------------------------------------------
# Strict (de)serialisation helpers: every error names the field.


def _entry_to_dict(e: Entry) -> dict[str, Any]:
    return {
        "spec": e.spec.to_dict(), "spec_name": e.spec.preset_name(), "precision": e.precision, "batch": e.batch,
        "points": [p.to_dict() for p in e.points],
        "fit": {"latency_p50_ms": e.fit.latency_p50.to_dict(), "latency_p90_ms": e.fit.latency_p90.to_dict(),
                "memory_mb": e.fit.memory.to_dict()},
        "basis": dict(e.basis) if e.basis is not None else None,
    }


def _entry_from_dict(data: Any, where: str) -> Entry:
    d = _obj(data, where, {"spec", "spec_name", "precision", "batch", "points", "fit", "basis"})
    try:
        spec = ViTSpec.from_dict(d["spec"])
    except SpecError as e:
        raise FormatError(f"field '{where}.spec': {e.message}") from None
    if d["spec_name"] is not None and d["spec_name"] != spec.preset_name():
        raise FormatError(f"field '{where}.spec_name' is {d['spec_name']!r} but the spec is "
                          f"{spec.preset_name() or 'not a preset'}")
    precision = _str(d["precision"], f"{where}.precision")
    _check_choice(precision, PRECISIONS, f"field '{where}.precision'")
    batch = _int(d["batch"], f"{where}.batch", minimum=1)
    points = []
    for i, p in enumerate(_list(d["points"], f"{where}.points")):
        pw = f"{where}.points[{i}]"
        pd = _obj(p, pw, set(_POINT_KEYS))
        vals: dict[str, Any] = {}
        for k in _POINT_KEYS:
            if k in ("depth", "n", "rounds"):
                vals[k] = _int(pd[k], f"{pw}.{k}", minimum=1 if k == "depth" else 0)
            else:
                vals[k] = _num(pd[k], f"{pw}.{k}", minimum=0.0)
        points.append(Point(**vals))
    if len({p.depth for p in points}) != len(points):
        raise FormatError(f"field '{where}.points' repeats a depth")
    fit_d = _obj(d["fit"], f"{where}.fit", {"latency_p50_ms", "latency_p90_ms", "memory_mb"})
    stored = {k: _fit_from_dict(fit_d[k], f"{where}.fit.{k}") for k in ("latency_p50_ms", "latency_p90_ms",
                                                                          "memory_mb")}
    basis = d["basis"]
    if basis is not None:
        basis = _obj(basis, f"{where}.basis", None)
    try:
        entry = make_entry(
            spec, precision, batch, points, latency_rel_floor=stored["latency_p50_ms"].rel_floor,
            memory_rel_floor=stored["memory_mb"].rel_floor, basis=basis,
        )
    except FormatError as e:
        raise FormatError(f"field '{where}.points': {e.message}") from None
    # The stored fit must be the one the stored points give: catches edited numbers.
    refit = {"latency_p50_ms": entry.fit.latency_p50, "latency_p90_ms": entry.fit.latency_p90,
             "memory_mb": entry.fit.memory}
    for key, fit in stored.items():
        again = refit[key]
        for name in FIT_KEYS:
            a, b = getattr(fit, name), getattr(again, name)
            if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9):
                raise FormatError(f"field '{where}.fit.{key}.{name}' is {a!r} but the points give {b!r}",
                                  hint="the file was edited or corrupted; re-measure or restore it")
    return Entry(spec=spec, precision=precision, batch=batch, points=entry.points,
                 fit=EntryFit(latency_p50=stored["latency_p50_ms"], latency_p90=stored["latency_p90_ms"],
                              memory=stored["memory_mb"]), basis=basis)


def _fit_from_dict(data: Any, where: str) -> LinearFit:
    d = _obj(data, where, set(FIT_KEYS))
    vals: dict[str, Any] = {}
    for k in FIT_KEYS:
        if k in ("n", "depth_min", "depth_max"):
            vals[k] = _int(d[k], f"{where}.{k}", minimum=1)
        elif k in ("intercept", "slope", "r2"):
            vals[k] = _num(d[k], f"{where}.{k}")
        else:
            vals[k] = _num(d[k], f"{where}.{k}", minimum=0.0)
    return LinearFit(**vals)


def _check_rising(e: Entry, where: str, measure_command: str) -> None:
    """A cost falling with depth is noise or an edit: refuse it (a solver would pick the deepest at ~0 ms)."""
    for label, fit, attr, unit in (("p50 latency", e.fit.latency_p50, "p50_ms", "ms"),
                                   ("p90 latency", e.fit.latency_p90, "p90_ms", "ms"),
                                   ("memory", e.fit.memory, "memory_mb", "MB")):
        first, last = fit.value(fit.depth_min), fit.value(fit.depth_max)
        if fit.slope < 0 and last < first - 1e-9 * max(abs(first), 1e-12):
            pts = ", ".join(f"depth {p.depth}: {getattr(p, attr):.4g} {unit}" for p in e.points)
            raise FormatError(
                f"{where} ({e.spec.preset_name() or 'custom spec'} {e.precision}, batch {e.batch}): {label} falls "
                f"with depth ({fit.slope:.4g} {unit}/block) over the measured points {pts}",
                hint=f"a deeper model cannot cost less; re-measure: {measure_command}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise FormatError(f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")


# The strict readers (tleg_deploy.files.schema): every error names the field.
_obj, _list, _str, _int, _num = schema.obj, schema.lst, schema.string, schema.integer, schema.number
_check_choice = schema.choice
