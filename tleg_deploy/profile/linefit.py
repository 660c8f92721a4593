"""The least-squares line behind every cost table: ``value(depth) = intercept + slope·depth``,
with R², the worst residual, the leave-one-out error and the textbook 95% prediction interval for
a new observation (see ``table``). Stdlib only (``statistics``): the profile tables load without
numpy, so ``fit`` against a stored profile starts fast; the tests check the fit against
``numpy.polyfit`` and the t quantile against ``scipy.stats.t.ppf``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tleg_deploy.errors import FormatError

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (3 decimals: within 2.3e-4 of
# scipy.stats.t.ppf(0.975, dof)). Between integers the linear interpolation errs high, never low (a
# wider interval): by up to 41% between 1 and 2 dof, 1.3% above 3, 0.3% above 5.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
# One-sided 95% quantiles (scipy.stats.t.ppf(0.95, dof), 3 decimals), for one-sided bounds (fit's verdict on a
# depth timed near its budget, ``deploy.fit_measure``).
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761,
        1.753, 1.746, 1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701,
        1.699, 1.697)


def _t_quantile(table: tuple[float, ...], z: float, dof: float) -> float:
    """Student's t from ``table`` (1..30 dof, linear between integers), Cornish-Fisher from the normal ``z``
    beyond."""
    if dof < 1:
        return table[0]
    if dof <= 30:
        lo = int(dof)
        if lo == dof or lo == 30:
            return table[lo - 1]
        frac = dof - lo
        return table[lo - 1] * (1 - frac) + table[lo] * frac
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def t975(dof: float) -> float:
    """Two-sided 95% Student-t quantile (table up to 30 dof, Cornish-Fisher beyond)."""
    return _t_quantile(_T975, 1.959964, dof)


def t95(dof: float) -> float:
    """One-sided 95% Student-t quantile (table up to 30 dof, Cornish-Fisher beyond)."""
    return _t_quantile(_T95, 1.644854, dof)


# ---------------------------------------------------------------------------------------------
# The fitted line


@dataclass(frozen=True)
class LinearFit:
    """``value(depth) = intercept + slope·depth`` by least squares, with what an interval needs.

    ``noise_std``/``noise_dof``: standard error of one point's value and its degrees of freedom
    (from the spread of per-round statistics); ``rel_floor``: the interval's half-width is at least
    this fraction of the prediction.
    """

    intercept: float
    slope: float
    r2: float
    worst_residual: float       # max |y - ŷ| over the points (same unit as y)
    worst_residual_rel: float   # max |y - ŷ| / y
    loo_error_rel: float        # max |y_i - ŷ_(-i)(x_i)| / y_i, leave-one-out (0 with < 3 points)
    resid_std: float            # sqrt(SSE / (n - 2)), 0 with 2 points
    noise_std: float
    noise_dof: float
    rel_floor: float
    n: int
    depth_min: int
    depth_max: int
    depth_mean: float
    sxx: float

    def value(self, depth: float) -> float:
        return self.intercept + self.slope * depth

    def half_width(self, depth: float) -> float:
        """Half-width of the 95% prediction interval for a new observation at ``depth``."""
        scale = self._t_s()
        stat = scale * math.sqrt(1.0 + 1.0 / self.n + (depth - self.depth_mean) ** 2 / self.sxx) if scale else 0.0
        # Beyond the measured depths the relative floor grows with the distance (cache capacity,
        # memory placement and kernel choice can change there; the line has not seen it).
        span = max(self.depth_max - self.depth_min, 1)
        excess = max(self.depth_min - depth, depth - self.depth_max, 0) / span
        return max(stat, self.rel_floor * (1.0 + excess) * abs(self.value(depth)))

    def _t_s(self) -> float:
        """``t · s`` of the interval: Student's t at the pooled degrees of freedom times the pooled scale."""
        resid_dof = max(self.n - 2, 0)
        dof = resid_dof + self.noise_dof
        if dof <= 0:
            return 0.0
        pooled = (resid_dof * self.resid_std**2 + self.noise_dof * self.noise_std**2) / dof
        return t975(dof) * max(math.sqrt(pooled), self.resid_std)

    def upper(self, depth: float) -> float:
        return self.value(depth) + self.half_width(depth)

    def nondecreasing_from(self) -> float:
        """A depth from which ``value`` and ``upper`` never decrease (``inf`` if the line falls).

        ``upper`` is the line plus the larger of two terms. The statistical one, ``t·s·sqrt(c + (d -
        x̄)²/Sxx)``, falls below the mean depth; the line outgrows it from ``x̄ - b·Sxx·sqrt(c / ((t·s)² -
        b²·Sxx))`` on (everywhere if ``(t·s)² <= b²·Sxx``). The relative floor ``rel_floor·(1 + excess)·|value|``
        shrinks towards the measured depths from below, and where the line is still negative. Below
        the returned depth a deeper model can get a *smaller* upper bound, so a search must not assume
        the depths that fit form one run there (``tleg_deploy.plan.solve``)."""
        b = self.slope
        if b < 0:
            return math.inf
        start = float(self.depth_min)
        if self.intercept < 0 < b:
            start = max(start, -self.intercept / b)
        ts, c = self._t_s(), 1.0 + 1.0 / self.n
        if ts * ts > b * b * self.sxx:
            start = max(start, self.depth_mean - b * self.sxx * math.sqrt(c / (ts * ts - b * b * self.sxx)))
        return start

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIT_KEYS}


FIT_KEYS = tuple(LinearFit.__dataclass_fields__)


def fit_line(
    depths: Sequence[int], values: Sequence[float], *, noise_std: float = 0.0, noise_dof: float = 0.0,
    rel_floor: float = 0.0,
) -> LinearFit:
    """Least-squares line through (depth, value) with R², worst residual and leave-one-out error."""
    n = len(depths)
    if n != len(values):
        raise FormatError(f"{n} depths but {len(values)} values")
    if n < 2 or len(set(depths)) < 2:
        raise FormatError(f"a fit needs at least 2 distinct depths, got {sorted(set(depths))}",
                          hint="measure at least 2 (default 3) depths")
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise FormatError(f"measured value {v!r} must be a finite non-negative number")
    intercept, slope = _lstsq(depths, values)
    xm = statistics.fmean(depths)
    ym = statistics.fmean(values)
    sxx = sum((x - xm) ** 2 for x in depths)
    resid = [y - (intercept + slope * x) for x, y in zip(depths, values, strict=True)]
    sse = sum(r * r for r in resid)
    sst = sum((y - ym) ** 2 for y in values)
    r2 = 1.0 - sse / sst if sst > 0 else 1.0
    loo = 0.0
    if n >= 3:
        for i in range(n):
            xs = [x for j, x in enumerate(depths) if j != i]
            if len(set(xs)) < 2:
                continue
            ys = [y for j, y in enumerate(values) if j != i]
            a, b = _lstsq(xs, ys)
            loo = max(loo, abs(values[i] - (a + b * depths[i])) / max(abs(values[i]), 1e-12))
    return LinearFit(
        intercept=intercept, slope=slope, r2=r2,
        worst_residual=max(abs(r) for r in resid),
        worst_residual_rel=max(abs(r) / max(abs(y), 1e-12) for r, y in zip(resid, values, strict=True)),
        loo_error_rel=loo, resid_std=math.sqrt(sse / (n - 2)) if n > 2 else 0.0,
        noise_std=float(noise_std), noise_dof=float(noise_dof), rel_floor=float(rel_floor), n=n,
        depth_min=min(depths), depth_max=max(depths), depth_mean=xm, sxx=sxx,
    )


def _lstsq(xs: Sequence[int], ys: Sequence[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line; ``xs`` holds at least 2 distinct values."""
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


