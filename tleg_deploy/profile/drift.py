"""The drift probe: is this machine as fast now as when its profile was measured?

A measured profile is a snapshot: a shared machine's speed moves by 20-50% within minutes (other
jobs, a laptop throttling, a Jetson's ``nvpmodel``). So a measured profile carries a *reference
point* (``ProbeInfo``): one architecture/precision/depth, the timing protocol, and the same
reference re-timed several times while the profile was measured (at the start, in the middle of
each session and after it; ``history``). Their median is the reference p50; their spread, with the
spread of the reference depth's per-round p50s, is the machine's own variation over time
(``variation_rel``), which widens every latency interval of the profile (``latency_terms``).

Before a cached measured profile of *this* host is used, ``probe(profile)`` re-times the reference
(about one second: the profiler's protocol, 1 intra-op thread, warm-up, interleaved rounds,
median) and ``apply`` returns the profile with a ``DriftReading``: the drift (now / then - 1) is
stated; beyond ``DRIFT_THRESHOLD`` every latency prediction is rescaled by the ratio (and the
reading says so). ``apply`` also records the reading in the profile's ``ProbeInfo.uses`` (the last
``MAX_USES``; saved with the profile where it is saved again, as the host cache is): the machine's
variation between uses, ``use_variation_rel``, is the typical change from one probe to the next
(root mean square of successive log ratios, the reference first, / √2), and ``variation_rel`` is the
larger of it and the profiling-time variation. A profile measured in 15 quiet seconds claims little
variation; the first probes that find the machine moved widen its intervals from then on.
Estimated profiles are never probed; a profile measured on another host cannot be probed here; an
old profile without a reference says the probe is unavailable.

The records are stdlib-only (``table`` stores them); only ``probe``/``Prober`` import the runners.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

from tleg_deploy.errors import FormatError, SpecError, TlegError
from tleg_deploy.files import schema
from tleg_deploy.model.spec import ViTSpec

if TYPE_CHECKING:
    from tleg_deploy.profile.table import DeviceProfile

# Beyond ±5% the predictions are rescaled: 5% is the quiet-machine floor of the profile's own interval
# (measure.QUIET_REL_FLOOR), so a smaller drift is already inside what the profile claims.
DRIFT_THRESHOLD = 0.05
Z95 = 1.959964
# A relative variation estimated from a few probes is itself uncertain; never claim less than this.
MIN_VARIATION = 0.02
MAX_USES = 20  # use-time probe readings kept in a profile (the oldest dropped first)


@dataclass(frozen=True)
class ProbeProtocol:
    """How the reference is timed (the profiler's ``timing.time_runners`` with these settings)."""

    threads: int = 1
    warmup: int = 3
    rounds: int = 5
    round_seconds: float = 0.1
    min_reps: int = 3
    statistic: str = "p50"


@dataclass(frozen=True)
class ProbeSample:
    """One timing of the reference: when (``phase``, seconds since profiling began), its p50 and the
    standard error of that p50 across the probe's rounds, and the machine's conditions then."""

    phase: str
    elapsed_s: float
    p50_ms: float
    se_ms: float
    conditions: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "elapsed_s": self.elapsed_s, "p50_ms": self.p50_ms, "se_ms": self.se_ms,
                "conditions": dict(self.conditions)}


@dataclass(frozen=True)
class ProbeInfo:
    """What a profile records so that it can be probed later (see the module docstring)."""

    spec: ViTSpec
    precision: str
    batch: int
    depth: int
    backend: str
    device: str
    protocol: ProbeProtocol
    history: tuple[ProbeSample, ...]
    round_rel_std: float  # std of the reference depth's per-round p50 in its profiling session / its p50
    uses: tuple[ProbeSample, ...] = ()  # probes taken when the profile was used (phase "use"), oldest first

    # Cached: every latency prediction of a probed profile reads both (the solver makes hundreds per solve).
    @cached_property
    def reference_p50_ms(self) -> float:
        return statistics.median(s.p50_ms for s in self.history)

    @cached_property
    def variation_rel(self) -> float:
        """Relative standard deviation of the machine's speed: the larger of the spread of the probes
        while profiling (log ratios to their median), of the per-round p50s, and of the change between
        successive uses (``use_variation_rel``); at least ``MIN_VARIATION``."""
        logs = [math.log(s.p50_ms / self.reference_p50_ms) for s in self.history if s.p50_ms > 0]
        spread = statistics.stdev(logs) if len(logs) > 1 else 0.0
        return max(spread, self.round_rel_std, self.use_variation_rel, MIN_VARIATION)

    @cached_property
    def use_variation_rel(self) -> float:
        """How much the machine's speed changes from one use of the profile to the next: the root mean
        square of successive differences of log(p50 / reference) over the reference (0) and the use-time
        probes, / √2 (one probe's share of a difference). 0 without uses."""
        logs = [0.0] + [math.log(s.p50_ms / self.reference_p50_ms) for s in self.uses if s.p50_ms > 0]
        diffs = [b - a for a, b in zip(logs, logs[1:], strict=False)]
        return math.sqrt(sum(d * d for d in diffs) / len(diffs) / 2) if diffs else 0.0

    def with_use(self, sample: ProbeSample) -> ProbeInfo:
        """This reference with one more use-time probe (the last ``MAX_USES`` kept)."""
        return replace(self, uses=(*self.uses, sample)[-MAX_USES:])

    def describe(self) -> str:
        return (f"{self.spec.preset_name() or 'custom spec'} {self.precision} depth {self.depth}, batch {self.batch} "
                f"({self.backend} {self.device}, {self.protocol.threads} thread(s))")

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "spec_name": self.spec.preset_name(), "precision": self.precision,
                "batch": self.batch, "depth": self.depth, "backend": self.backend, "device": self.device,
                "protocol": {k: getattr(self.protocol, k) for k in ProbeProtocol.__dataclass_fields__},
                "reference_p50_ms": self.reference_p50_ms, "variation_rel": self.variation_rel,
                "round_rel_std": self.round_rel_std, "history": [s.to_dict() for s in self.history],
                "uses": [s.to_dict() for s in self.uses]}

    @classmethod
    def from_dict(cls, data: Any, where: str = "probe") -> ProbeInfo:
        d = schema.obj(data, where, {"spec", "spec_name", "precision", "batch", "depth", "backend", "device",
                                     "protocol", "reference_p50_ms", "variation_rel", "round_rel_std", "history"},
                       optional={"uses"})  # "uses": written since 2026-12-02; older files have none
        try:
            spec = ViTSpec.from_dict(d["spec"])
        except SpecError as e:
            raise FormatError(f"field '{where}.spec': {e.message}") from None
        p = schema.obj(d["protocol"], f"{where}.protocol", set(ProbeProtocol.__dataclass_fields__))
        protocol = ProbeProtocol(
            **{k: schema.integer(p[k], f"{where}.protocol.{k}", minimum=0)
               for k in ("threads", "warmup", "rounds", "min_reps")},
            round_seconds=schema.number(p["round_seconds"], f"{where}.protocol.round_seconds", minimum=0.0),
            statistic=schema.string(p["statistic"], f"{where}.protocol.statistic"))
        history = _samples(d["history"], f"{where}.history")
        uses = _samples(d.get("uses", []), f"{where}.uses")
        if not history or not all(s.p50_ms > 0 for s in (*history, *uses)):
            raise FormatError(f"field '{where}.history' needs at least one positive p50, and every p50 in "
                              f"'{where}.history' and '{where}.uses' must be positive")
        info = cls(spec=spec, precision=schema.string(d["precision"], f"{where}.precision"),
                   batch=schema.integer(d["batch"], f"{where}.batch", minimum=1),
                   depth=schema.integer(d["depth"], f"{where}.depth", minimum=1),
                   backend=schema.string(d["backend"], f"{where}.backend"),
                   device=schema.string(d["device"], f"{where}.device"), protocol=protocol,
                   history=tuple(history), uses=tuple(uses),
                   round_rel_std=schema.number(d["round_rel_std"], f"{where}.round_rel_std", minimum=0.0))
        for key in ("reference_p50_ms", "variation_rel"):  # derived: an edited number is caught
            stored = schema.number(d[key], f"{where}.{key}")
            if not math.isclose(stored, getattr(info, key), rel_tol=1e-6):
                raise FormatError(f"field '{where}.{key}' is {stored!r} but the history gives {getattr(info, key)!r}",
                                  hint="the file was edited or corrupted; re-measure or restore it")
        return info


def _samples(data: Any, where: str) -> list[ProbeSample]:
    out = []
    for i, s in enumerate(schema.lst(data, where)):
        sw = f"{where}[{i}]"
        sd = schema.obj(s, sw, {"phase", "elapsed_s", "p50_ms", "se_ms", "conditions"})
        out.append(ProbeSample(
            phase=schema.string(sd["phase"], f"{sw}.phase"),
            elapsed_s=schema.number(sd["elapsed_s"], f"{sw}.elapsed_s", minimum=0.0),
            p50_ms=schema.number(sd["p50_ms"], f"{sw}.p50_ms", minimum=0.0),
            se_ms=schema.number(sd["se_ms"], f"{sw}.se_ms", minimum=0.0),
            conditions=schema.obj(sd["conditions"], f"{sw}.conditions", None)))
    return out


# ---------------------------------------------------------------------------------------------
# The reading before use


STATUSES = ("rescaled", "within", "unavailable", "not-probed", "other-host", "failed")


@dataclass(frozen=True)
class DriftReading:
    """The probe's answer for one use of a profile. ``scale`` multiplies every latency prediction."""

    status: str                       # one of STATUSES
    message: str                      # the line commands print
    ratio: float | None = None        # probe now / reference (None: not probed)
    probe_ms: float | None = None
    reference_ms: float | None = None
    probe_se_rel: float = 0.0         # the probe's own standard error, relative
    probe_rel_std: float = 0.0        # spread of the probe's per-round p50s, relative: the variation *now*
    threshold: float = DRIFT_THRESHOLD
    conditions: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        return self.ratio if self.status == "rescaled" and self.ratio is not None else 1.0

    @property
    def drift(self) -> float | None:
        return None if self.ratio is None else self.ratio - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "drift": self.drift, "ratio": self.ratio,
                "scale": self.scale, "probe_p50_ms": self.probe_ms, "reference_p50_ms": self.reference_ms,
                "probe_se_rel": self.probe_se_rel, "probe_rel_std": self.probe_rel_std, "threshold": self.threshold,
                "conditions": dict(self.conditions)}


def read_drift(info: ProbeInfo, p50_ms: float, se_ms: float, *, threshold: float = DRIFT_THRESHOLD,
               name: str = "host", conditions: Mapping[str, Any] | None = None) -> DriftReading:
    """Compare a fresh probe (``p50_ms``) with the profile's reference: rescale beyond ``threshold``."""
    if not (math.isfinite(p50_ms) and p50_ms > 0):
        return DriftReading("failed", f"drift probe of {name}: the probe gave {p50_ms!r} ms; predictions unchanged")
    ref = info.reference_p50_ms
    ratio = p50_ms / ref
    head = (f"drift probe of {name} ({info.describe()}): p50 {p50_ms:.4g} ms now vs {ref:.4g} ms when profiled, "
            f"drift {ratio - 1:+.1%}")
    if abs(ratio - 1) > threshold:
        status, tail = "rescaled", (f": beyond ±{threshold:.0%}, latency predictions rescaled ×{ratio:.3f} "
                                    "(re-measure with --refresh / --refresh-profile for a new profile)")
    else:
        status, tail = "within", f": within ±{threshold:.0%}, predictions as profiled"
    return DriftReading(status, head + tail, ratio=ratio, probe_ms=p50_ms, reference_ms=ref,
                        probe_se_rel=se_ms / p50_ms, probe_rel_std=se_ms * math.sqrt(info.protocol.rounds) / p50_ms,
                        threshold=threshold, conditions=dict(conditions or {}))


def latency_terms(info: ProbeInfo | None, reading: DriftReading | None) -> tuple[float, float]:
    """``(scale, extra_rel)`` for a profile's latency predictions: the probe's rescaling, and the relative
    half-width added in quadrature to the fit's 95% interval: the machine's variation over time
    (``z·variation_rel`` as recorded while profiling, or as the fresh probe's rounds show it now if the
    machine is noisier now), the fresh probe's own error, and a drift left uncorrected (within threshold)."""
    if info is None:
        return (reading.scale if reading is not None else 1.0), 0.0
    extra = (Z95 * info.variation_rel) ** 2
    if reading is not None and reading.ratio is not None:
        extra = (Z95 * max(info.variation_rel, reading.probe_rel_std)) ** 2 + (Z95 * reading.probe_se_rel) ** 2
        if reading.status != "rescaled":
            extra += (reading.ratio - 1.0) ** 2
    return (reading.scale if reading is not None else 1.0), math.sqrt(extra)


# ---------------------------------------------------------------------------------------------
# Timing the reference (imports the runners: torch / onnxruntime)


class Prober:
    """Builds the reference artifact once and times it with the probe protocol (``sample``)."""

    def __init__(self, spec: ViTSpec, precision: str, depth: int, *, backend: str = "onnxruntime",
                 device: str = "cpu", batch: int = 1, protocol: ProbeProtocol | None = None) -> None:
        import tempfile
        from pathlib import Path

        from tleg_deploy.profile.config import MeasureConfig
        from tleg_deploy.profile.runners import make_runner

        self.spec, self.precision, self.depth, self.batch = spec, precision, depth, batch
        self.backend, self.device = backend, device
        self.protocol = protocol or ProbeProtocol()
        pr = self.protocol
        # depths: MeasureConfig wants two; only the probe's depth is built and timed.
        self.cfg = MeasureConfig(backend=backend, precisions=(precision,), depths=(depth, 2 if depth == 1 else 1),
                                 batch=batch, threads=pr.threads, device=device, warmup=pr.warmup, rounds=pr.rounds,
                                 round_seconds=pr.round_seconds, min_reps=pr.min_reps, memory=False, extra_rounds=0,
                                 retries=0)
        self._tmp = tempfile.TemporaryDirectory(prefix="tleg-probe-")
        self.runner: Any = make_runner(self.cfg, spec, depth, precision, Path(self._tmp.name))[0]
        self.t0 = time.perf_counter()

    def time(self) -> tuple[float, float]:
        """(p50 ms, its standard error across rounds) of the reference now."""
        from tleg_deploy.profile.timing import time_runners

        s = time_runners({self.depth: self.runner}, self.cfg)[self.depth]
        return s["p50"], s["p50_se"]

    def sample(self, phase: str) -> ProbeSample:
        from tleg_deploy.profile.env import conditions

        p50, se = self.time()
        return ProbeSample(phase=phase, elapsed_s=round(time.perf_counter() - self.t0, 3), p50_ms=p50, se_ms=se,
                           conditions=conditions())

    def info(self, history: Sequence[ProbeSample], round_rel_std: float) -> ProbeInfo:
        return ProbeInfo(spec=self.spec, precision=self.precision, batch=self.batch, depth=self.depth,
                         backend=self.backend, device=self.device, protocol=self.protocol, history=tuple(history),
                         round_rel_std=round_rel_std)

    def close(self) -> None:
        self.runner = None
        self._tmp.cleanup()


_PROBERS: dict[tuple[Any, ...], Prober] = {}


def check_probe(profile: DeviceProfile) -> DriftReading | None:
    """Why ``profile`` cannot be probed here (a reading to show), or ``None`` if it can."""
    if profile.source != "measured":
        return DriftReading("not-probed", f"{profile.name} is an {profile.source} profile: no drift probe")
    from tleg_deploy.profile.env import host_fingerprint

    if profile.host_fingerprint != host_fingerprint():
        return DriftReading("other-host", f"{profile.name} was measured on another host: its drift cannot be "
                                          "probed here (predictions as profiled)")
    if profile.probe is None:
        return DriftReading("unavailable", f"drift probe unavailable: {profile.name}'s profile records no reference "
                                           "point (measured before probes existed); re-measure with --refresh / "
                                           "--refresh-profile")
    return None


def probe(profile: DeviceProfile, *, threshold: float = DRIFT_THRESHOLD,
          prober: Callable[[ProbeInfo], tuple[float, float]] | None = None) -> DriftReading:
    """Time ``profile``'s reference point now (about a second) and compare (``read_drift``); never raises
    for a probe that cannot run: the reading says why. ``prober`` replaces the timing (tests)."""
    why = check_probe(profile)
    info = profile.probe
    if why is not None or info is None:
        return why or DriftReading("unavailable", "drift probe unavailable")
    from tleg_deploy.profile.env import conditions

    try:
        if prober is not None:
            p50, se = prober(info)
        else:
            key = (info.spec, info.precision, info.depth, info.backend, info.device, info.batch, info.protocol)
            if key not in _PROBERS:  # built once per process (the export is the slow part, not the timing)
                _PROBERS[key] = Prober(info.spec, info.precision, info.depth, backend=info.backend,
                                       device=info.device, batch=info.batch, protocol=info.protocol)
            p50, se = _PROBERS[key].time()
    except (TlegError, OSError, RuntimeError, ImportError) as e:
        return DriftReading("failed", f"drift probe of {profile.name} failed ({type(e).__name__}: {e}); "
                                      "predictions as profiled")
    return read_drift(info, p50, se, threshold=threshold, name=profile.name, conditions=conditions())


def apply(profile: DeviceProfile, reading: DriftReading) -> DeviceProfile:
    """``profile`` predicting with ``reading`` (rescaled latencies if it says so; the reading travels with it),
    the reading recorded in its reference's ``uses`` when it timed the reference (see the module docstring)."""
    info = profile.probe
    if info is not None and reading.probe_ms is not None and reading.probe_ms > 0:
        sample = ProbeSample(phase="use", elapsed_s=0.0, p50_ms=reading.probe_ms,
                             se_ms=reading.probe_se_rel * reading.probe_ms, conditions=dict(reading.conditions))
        info = info.with_use(sample)
    return replace(profile, probe=info, drift=reading)


def probe_and_apply(profile: DeviceProfile, *, threshold: float = DRIFT_THRESHOLD,
                    log: Callable[[str], None] | None = None) -> DeviceProfile:
    """``apply(profile, probe(profile))``, saying the reading through ``log``."""
    reading = probe(profile, threshold=threshold)
    if log is not None:
        log(reading.message)
    return apply(profile, reading)
