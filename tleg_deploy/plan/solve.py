"""``solve(profile, budget)``: the deepest (or most accurate) expansion that fits a budget.

A learngene (Xia et al., AAAI 2024) initializes a ViT of any depth, so deploying it is a search
over depth x precision. The search only sees a narrow "estimate the cost" interface (as in
once-for-all's efficiency predictor): a device profile's ``predict(depth, spec=, precision=)``
for latency and peak memory, and ``costs.py`` for the exact parameters, MACs and artifact bytes.

Fitting "with confidence" means the *upper* end of the profile's 95% prediction interval is
compared with the budget; ``margin`` tightens the predicted budgets (latency, memory) further, e.g.
``margin=0.1`` asks the upper prediction to stay under 90% of the budget. Exact figures (params,
MACs, bytes) are compared as they are.

Cost grows with depth (the profile is linear in depth, costs.py is affine) except where the
profile's prediction interval widens below its measured depths; the profile says from which depth
its predictions are non-decreasing (``monotone_from``), so each precision's deepest fitting depth is
found by binary search above that depth and a short scan below it: no unbounded loops, and a few
dozen predictions per solve. Torch-free, stdlib only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tleg_deploy.errors import DeviceError, InfeasibleError, TlegError, UnitError
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.plan import costs
from tleg_deploy.plan.budget import CONSTRAINTS, Budget, format_limit
from tleg_deploy.plan.precisions import PRECISIONS  # highest precision first: ties go to the earlier one

OBJECTIVES = ("deepest", "accuracy")
DEFAULT_MAX_DEPTH = 48
PLAN_FORMAT = "tleg-plan"
PLAN_SCHEMA_VERSION = 1


class _Prediction(Protocol):
    depth: int
    precision: str
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p50_upper_ms: float
    latency_p90_upper_ms: float
    memory_mb: float
    memory_upper_mb: float
    extrapolated: bool
    source: str


class Profile(Protocol):
    """What the solver needs of a ``tleg_deploy.profile.table.DeviceProfile``."""

    @property
    def name(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def measure_command(self) -> str: ...

    def precisions(self, spec: ViTSpec, batch: int = 1) -> tuple[str, ...]: ...

    def predict(self, depth: int, *, spec: ViTSpec, precision: str, batch: int = 1) -> Any: ...


@dataclass(frozen=True)
class Candidate:
    """One (device, depth, precision) option with its predicted and exact costs."""

    device: str
    depth: int
    precision: str
    latency_ms: float           # predicted, at the budget's percentile
    latency_upper_ms: float     # upper end of the 95% prediction interval
    memory_mb: float
    memory_upper_mb: float
    params: int
    macs: int
    artifact_bytes: int
    extrapolated: bool
    source: str                 # "measured" | "estimated" (the profile's)
    violations: tuple[str, ...] = ()  # e.g. "5.40 ms > 5.00 ms" (what failed, against the limit)
    violated: tuple[str, ...] = ()    # the constraints violated, the worst (largest relative excess) first
    accuracy: float | None = None

    @property
    def fits(self) -> bool:
        return not self.violations

    def value(self, constraint: str) -> float:
        """The figure compared with a budget: the upper prediction for predicted costs."""
        return float({"latency": self.latency_upper_ms, "memory": self.memory_upper_mb, "params": self.params,
                      "macs": self.macs, "bytes": self.artifact_bytes}[constraint])

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "depth": self.depth, "precision": self.precision,
                "latency_ms": self.latency_ms, "latency_upper_ms": self.latency_upper_ms,
                "memory_mb": self.memory_mb, "memory_upper_mb": self.memory_upper_mb, "params": self.params,
                "macs": self.macs, "artifact_bytes": self.artifact_bytes, "extrapolated": self.extrapolated,
                "source": self.source, "fits": self.fits, "violated": list(self.violated),
                "violations": list(self.violations),
                "accuracy": self.accuracy}


@dataclass(frozen=True)
class Plan:
    """The solver's answer: the pick, why, and the options it weighed."""

    pick: Candidate
    budget: Budget
    spec: ViTSpec
    objective: str
    margin: float
    binding: str                          # the constraint that stops a deeper model ("max_depth" if none)
    margins: dict[str, float]             # constraint -> relative slack of the pick, (limit - value) / limit
    why_not_deeper: str
    deeper: tuple[Candidate, ...]         # the next deeper depth, one per precision weighed
    candidates: tuple[Candidate, ...]     # the table shown to users, by depth then precision
    max_depth: int
    measure_command: str = ""
    warnings: tuple[str, ...] = field(default=())
    drift: Mapping[str, Any] | None = None  # the pick's profile's drift probe reading (profile.drift), if any

    @property
    def depth(self) -> int:
        return self.pick.depth

    @property
    def precision(self) -> str:
        return self.pick.precision

    @property
    def device(self) -> str:
        return self.pick.device

    @property
    def source(self) -> str:
        return self.pick.source

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "schema_version": PLAN_SCHEMA_VERSION,
            "device": self.device, "source": self.source, "depth": self.depth, "precision": self.precision,
            "objective": self.objective, "margin": self.margin, "budget": self.budget.to_dict(),
            "spec": self.spec.to_dict(), "spec_preset": self.spec.preset_name(), "max_depth": self.max_depth,
            "binding": self.binding, "margins": self.margins, "why_not_deeper": self.why_not_deeper,
            "pick": self.pick.to_dict(), "deeper": [c.to_dict() for c in self.deeper],
            "candidates": [c.to_dict() for c in self.candidates], "measure_command": self.measure_command,
            "warnings": list(self.warnings), "drift": dict(self.drift) if self.drift is not None else None,
        }


def default_max_depth(aux_depth: int | None = None, accuracy: Mapping[int, float] | None = None) -> int:
    """The deepest depth searched when none is asked for: the accuracy table's deepest depth when there
    is a table (beyond it accuracy is unknown); else twice the learngene's Aux-Net depth (TLEG trains the
    Aux-Net at ``aux_depth``; far deeper expansions are extrapolations), within ``MAX_DEPTH``; else
    ``DEFAULT_MAX_DEPTH``."""
    if accuracy:
        return min(max(_check_accuracy(accuracy)), MAX_DEPTH)
    if aux_depth is not None:
        return min(2 * check_depth(aux_depth), MAX_DEPTH)
    return DEFAULT_MAX_DEPTH


def depth_notes(depth: int, aux_depth: int | None, accuracy: Mapping[int, float] | None = None) -> list[str]:
    """What a pick at ``depth`` must say about its accuracy: nothing while the accuracy table covers it
    or it is within the Aux-Net depth; otherwise that its accuracy is not measured."""
    if aux_depth is None or depth <= aux_depth or (accuracy and depth in accuracy):
        return []
    return [f"depth {depth} is deeper than the learngene's Aux-Net depth {aux_depth}: its accuracy is not "
            f"measured (the learngene was trained as a depth-{aux_depth} Aux-Net; evaluate the model on your "
            f"data, or bound the search with --max-depth {aux_depth})"]


def check_options(*, max_depth: int | None = None, precisions: Sequence[str] | None = None,
                  objective: str = "deepest", margin: float = 0.0,
                  accuracy: Mapping[int, float] | None = None) -> dict[int, float]:
    """Validate ``solve``'s search options without a profile (so ``fit`` can reject them before it
    measures a device); returns the checked accuracy table."""
    if max_depth is not None:
        check_depth(max_depth, maximum=MAX_DEPTH)
    if not 0.0 <= margin < 1.0 or not math.isfinite(margin):
        raise UnitError(f"margin {margin!r} must be in [0, 1)", hint="e.g. 0.1 keeps 10% headroom")
    if objective not in OBJECTIVES:
        raise TlegError(f"unknown objective {objective!r}", hint=f"use one of {', '.join(OBJECTIVES)}")
    unknown = [p for p in precisions or () if p not in PRECISIONS]
    if unknown:
        raise TlegError(f"unknown precision {unknown[0]!r}", hint=f"use {', '.join(PRECISIONS)}")
    acc = {} if accuracy is None else _check_accuracy(accuracy)
    if objective == "accuracy" and not acc:
        raise TlegError("objective 'accuracy' needs an accuracy-by-depth table",
                        hint="pass accuracy={depth: top1} or run benchmarks/paper_claims.py")
    return acc


def solve(
    profiles: Profile | Sequence[Profile],
    budget: Budget,
    *,
    spec: ViTSpec,
    max_depth: int | None = None,
    precisions: Sequence[str] | None = None,
    objective: str = "deepest",
    margin: float = 0.0,
    accuracy: Mapping[int, float] | None = None,
    batch: int = 1,
) -> Plan:
    """Search depth x precision on each profile for the best option that fits ``budget``.

    ``profiles``: one profile, or several alternatives for the same target (e.g. two backends); the
    pick may come from any of them. ``objective="deepest"`` picks the deepest fitting depth (ties:
    higher precision, then the earlier profile); ``"accuracy"`` the fitting depth with the highest
    ``accuracy[depth]`` (ties: the shallower), over the depths the table covers. ``max_depth`` None:
    ``default_max_depth(accuracy=accuracy)`` (the table's deepest depth, else ``DEFAULT_MAX_DEPTH``).
    Raises ``InfeasibleError`` naming the cheapest option's cost next to the budget.
    """
    acc = check_options(max_depth=max_depth, precisions=precisions, objective=objective, margin=margin,
                        accuracy=accuracy)
    max_depth = default_max_depth(accuracy=acc) if max_depth is None else max_depth
    if isinstance(profiles, str):
        raise DeviceError(f"solve() takes DeviceProfile objects, not the name {profiles!r}",
                          hint="resolve it first: tleg_deploy.profile.registry.resolve_profile(name, spec=spec)")
    plist = [profiles] if not isinstance(profiles, Sequence) else list(profiles)
    if not plist:
        raise DeviceError("no device profile given")
    options = _options(plist, spec, batch, precisions)
    limits = budget.limits()
    cache: dict[tuple[int, int, str], Candidate] = {}

    def cand(i: int, depth: int, precision: str) -> Candidate:
        key = (i, depth, precision)
        if key not in cache:
            cache[key] = _candidate(plist[i], depth, precision, spec, batch, budget, limits, margin, acc)
        return cache[key]

    # Deepest fitting depth per option (0: none fits).
    deepest = {(i, p): _deepest_fitting(lambda d, i=i, p=p: cand(i, d, p).fits, max_depth,
                                        _monotone_from(plist[i], spec, p, batch)) for i, p in options}
    if not any(deepest.values()):
        raise _infeasible(budget, [cand(i, 1, p) for i, p in options], margin)

    order = {opt: k for k, opt in enumerate(options)}  # options are listed highest precision first
    if objective == "deepest":
        best = max((opt for opt in options if deepest[opt]), key=lambda o: (deepest[o], -order[o]))
        pick = cand(best[0], deepest[best], best[1])
    else:
        fitting = [(acc[d], -d, -order[o], o, d) for o in options for d in acc
                   if 1 <= d <= min(deepest[o], max_depth) and cand(o[0], d, o[1]).fits]
        if not fitting:
            raise InfeasibleError(
                f"no depth covered by the accuracy table ({_depth_range(acc)}) fits {budget.describe()}",
                hint="use objective 'deepest' or extend the accuracy table")
        _, _, _, o, d = max(fitting)
        pick = cand(o[0], d, o[1])

    deeper = tuple(cand(i, pick.depth + 1, p) for i, p in options) if pick.depth < max_depth else ()
    binding, why = _why_not_deeper(pick, deeper, max_depth, objective)
    shown = _table(options, pick.depth, deepest, max_depth, cand)
    warnings = []
    if pick.extrapolated:
        warnings.append(f"depth {pick.depth} is outside the depths measured on {pick.device}: "
                        "its prediction is extrapolated")
    if pick.source == "estimated":
        warnings.append(f"{pick.device} is an estimated profile (a roofline, not a measurement)")
    # A profile probed before use (tleg_deploy.profile.drift) carries its reading: say it with the plan.
    reading = getattr(plist[_index(plist, pick)], "drift", None)
    if reading is not None:
        warnings.append(reading.message)
    return Plan(
        pick=pick, budget=budget, spec=spec, objective=objective, margin=margin, binding=binding,
        margins={name: (limit - pick.value(name)) / limit for name, limit in limits.items()},
        why_not_deeper=why, deeper=deeper, candidates=shown, max_depth=max_depth,
        measure_command=plist[_index(plist, pick)].measure_command,
        warnings=tuple(warnings), drift=reading.to_dict() if reading is not None else None,
    )


def evaluate(profile: Profile, budget: Budget, *, spec: ViTSpec, depth: int, precision: str, margin: float = 0.0,
             accuracy: Mapping[int, float] | None = None, batch: int = 1) -> Candidate:
    """One option's predicted and exact costs against ``budget`` (what ``solve`` weighs per option)."""
    acc = {} if accuracy is None else _check_accuracy(accuracy)
    return _candidate(profile, depth, precision, spec, batch, budget, budget.limits(), margin, acc)


def _index(plist: Sequence[Profile], pick: Candidate) -> int:
    return next(i for i, p in enumerate(plist) if p.name == pick.device)


def load_accuracy_table(path: str | Path, init: str = "tleg") -> dict[int, float]:
    """``{depth: test top-1}`` from a JSON file: either the paper-claims benchmark's results
    (``{"accuracy": {init: {depth: {"mean": ...}}}}``) or a plain ``{depth: accuracy}`` object."""
    try:
        data = json.loads(Path(path).read_text())
        rows = data["accuracy"][init] if isinstance(data, dict) and "accuracy" in data else data
        table = {int(d): float(v["mean"] if isinstance(v, dict) else v) for d, v in rows.items()}
    except FileNotFoundError:
        raise TlegError(f"no accuracy table at {path}",
                        hint='pass --accuracy FILE ({"depth": top1, ...}) or run benchmarks/paper_claims.py') from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TlegError(f"{path} has no usable accuracy table for {init!r}: {type(e).__name__}: {e}",
                        hint='write {"depth": top1, ...} or run benchmarks/paper_claims.py') from None
    return _check_accuracy(table)


def _options(plist: Sequence[Profile], spec: ViTSpec, batch: int,
             wanted: Sequence[str] | None) -> list[tuple[int, str]]:
    options = []
    for precision in PRECISIONS:  # highest first, so earlier options win ties
        for i, prof in enumerate(plist):
            if precision in prof.precisions(spec, batch) and (wanted is None or precision in wanted):
                options.append((i, precision))
    if not options:
        have = sorted({p for prof in plist for p in prof.precisions(spec, batch)})
        names = ", ".join(p.name for p in plist)
        name = spec.preset_name() or "this spec"
        if have:
            raise DeviceError(f"{names} has no {'/'.join(wanted or ())} entry for {name}",
                              hint=f"it has {', '.join(have)}")
        raise DeviceError(f"{names} has no cost data for {name} (batch {batch})",
                          hint=f"measure it: {plist[0].measure_command}")
    return options


def _candidate(prof: Profile, depth: int, precision: str, spec: ViTSpec, batch: int, budget: Budget,
               limits: Mapping[str, float], margin: float, acc: Mapping[int, float]) -> Candidate:
    pred: _Prediction = prof.predict(depth, spec=spec, precision=precision, batch=batch)
    p90 = budget.percentile == "p90"
    c = Candidate(
        device=prof.name, depth=depth, precision=precision,
        latency_ms=pred.latency_p90_ms if p90 else pred.latency_p50_ms,
        latency_upper_ms=pred.latency_p90_upper_ms if p90 else pred.latency_p50_upper_ms,
        memory_mb=pred.memory_mb, memory_upper_mb=pred.memory_upper_mb,
        params=costs.params(spec, depth), macs=costs.macs(spec, depth, batch),
        artifact_bytes=costs.artifact_bytes(spec, depth, precision),
        extrapolated=bool(pred.extrapolated), source=str(pred.source), accuracy=acc.get(depth),
    )
    over = []
    for name, limit in limits.items():
        allowed = limit * (1.0 - margin) if CONSTRAINTS[name][2] else limit
        if c.value(name) > allowed:
            label = {"latency": f"{budget.percentile} latency ", "memory": "memory "}.get(name, "")
            why = f"{label}{format_limit(name, c.value(name))} > {format_limit(name, allowed)}"
            over.append((c.value(name) / allowed, name, why))
    over.sort(reverse=True)
    return dataclasses.replace(c, violated=tuple(o[1] for o in over), violations=tuple(o[2] for o in over))


def _deepest_fitting(fits: Any, max_depth: int, monotone_from: int) -> int:
    """Largest d in 1..max_depth with fits(d); 0 if none.

    Every cost is non-decreasing in depth from ``monotone_from`` on (exact costs everywhere; the
    profile's upper predictions from about its mean measured depth), so there the depths that fit
    are a prefix and binary search finds its end. Below it, a prediction interval that widens away
    from the measured depths can make a shallower depth cost *more* than a deeper one, so the fitting
    depths need not form one run: those few depths are scanned from the top down.
    """
    start = min(max(monotone_from, 1), max_depth + 1)
    if start <= max_depth and fits(start):
        lo, hi = start, max_depth  # invariant: fits(lo); the answer is in [lo, hi]
        while lo < hi:  # at most log2(max_depth) + 1 rounds
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        return lo
    return next((d for d in range(start - 1, 0, -1) if fits(d)), 0)


def _monotone_from(prof: Profile, spec: ViTSpec, precision: str, batch: int) -> int:
    """Where ``prof``'s predictions stop falling with depth; a profile that cannot say is scanned whole."""
    monotone_from = getattr(prof, "monotone_from", None)
    return int(monotone_from(spec, precision, batch)) if monotone_from is not None else MAX_DEPTH + 1


def _why_not_deeper(pick: Candidate, deeper: Sequence[Candidate], max_depth: int, objective: str) -> tuple[str, str]:
    if not deeper:
        return "max_depth", f"depth {pick.depth} is the deepest searched (max_depth {max_depth})"
    same = next((c for c in deeper if c.precision == pick.precision and c.device == pick.device), deeper[0])
    if same.fits:  # only possible with objective="accuracy"
        return "accuracy", (f"depth {same.depth} also fits, but no deeper depth in the accuracy table that fits "
                            f"beats {_acc(pick.accuracy)}")
    binding = same.violated[0]
    parts = [f"{c.precision}: {'; '.join(c.violations)}" for c in deeper if not c.fits]
    return binding, f"depth {same.depth} does not fit: " + " | ".join(parts)


def _table(options: Sequence[tuple[int, str]], depth: int, deepest: Mapping[tuple[int, str], int], max_depth: int,
           cand: Any) -> tuple[Candidate, ...]:
    """The options around the pick (depth-2 .. depth+2) and each option's own deepest fit."""
    depths = {d for d in range(depth - 2, depth + 3) if 1 <= d <= max_depth}
    rows = {(d, o) for d in depths for o in options}
    rows |= {(deepest[o], o) for o in options if deepest[o]}
    rows |= {(deepest[o] + 1, o) for o in options if deepest[o] < max_depth}
    order = {o: k for k, o in enumerate(options)}
    return tuple(cand(o[0], d, o[1]) for d, o in sorted(rows, key=lambda r: (r[0], order[r[1]])))


def _infeasible(budget: Budget, cheapest_per_option: Sequence[Candidate], margin: float) -> InfeasibleError:
    # The cheapest option: the fewest violated constraints, then the lowest latency.
    c = min(cheapest_per_option, key=lambda c: (len(c.violations), c.latency_upper_ms, c.memory_upper_mb))
    head = f"no depth fits {budget.describe()} on {c.device}"
    if margin:
        head += f" with margin {margin:.0%}"
    return InfeasibleError(
        f"{head}: the cheapest option, depth 1 {c.precision}, needs {'; '.join(c.violations)}",
        hint="raise the budget, allow a lower precision, or choose a faster device")


def _check_accuracy(table: Mapping[int, float]) -> dict[int, float]:
    out = {}
    for d, a in table.items():
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise TlegError(f"accuracy table depth {d!r} must be a positive integer")
        if isinstance(a, bool) or not (isinstance(a, (int, float)) and math.isfinite(a)):
            raise TlegError(f"accuracy table value {a!r} at depth {d} must be a finite number")
        if not 0.0 <= a <= 1.0:
            raise TlegError(f"accuracy table value {a!r} at depth {d} is not a fraction in [0, 1]",
                            hint="write top-1 accuracy as a fraction, e.g. 0.72 for 72%")
        out[d] = float(a)
    return out


def _depth_range(acc: Mapping[int, float]) -> str:
    return f"depths {min(acc)}..{max(acc)}" if acc else "empty"


def _acc(a: float | None) -> str:
    return "n/a" if a is None else f"{a:.1%}"
