"""The hand-kept parts of the line fit against the reference implementations: numpy.polyfit for the
least squares and leave-one-out, scipy.stats.t.ppf for the t quantile and the prediction interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tleg_deploy.profile.linefit import fit_line, t95, t975


@pytest.fixture(scope="module")
def stats():  # type: ignore[no-untyped-def]
    """scipy.stats: the dev extra, only the tests use it (imported here, not at collection: 0.5 s per worker)."""
    return pytest.importorskip("scipy.stats")


def test_t975_matches_scipy_at_integer_dof(stats) -> None:  # type: ignore[no-untyped-def]
    for dof in range(1, 301):
        assert t975(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=3e-4), dof


def test_t95_matches_scipy_at_integer_dof(stats) -> None:  # type: ignore[no-untyped-def]
    for dof in range(1, 301):
        assert t95(dof) == pytest.approx(stats.t.ppf(0.95, dof), rel=3e-4), dof


def test_t975_between_integers_errs_high_only(stats) -> None:  # type: ignore[no-untyped-def]
    for dof in np.arange(1.0, 60.0, 0.05):
        ref = stats.t.ppf(0.975, dof)
        rel = (t975(float(dof)) - ref) / ref
        assert -3e-4 <= rel <= (0.42 if dof < 3 else 0.014), dof


@pytest.mark.parametrize("seed", range(5))
def test_fit_matches_numpy_polyfit(seed: int, stats) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    depths = sorted(rng.choice(np.arange(1, 49), size=int(rng.integers(3, 9)), replace=False).tolist())
    values = [0.7 + 0.31 * d + float(rng.normal(0, 0.2)) for d in depths]
    fit = fit_line(depths, values)
    slope, intercept = np.polyfit(depths, values, 1)
    assert (fit.intercept, fit.slope) == pytest.approx((intercept, slope), rel=1e-9, abs=1e-12)
    resid = np.asarray(values) - np.polyval([slope, intercept], depths)
    assert fit.r2 == pytest.approx(np.corrcoef(depths, values)[0, 1] ** 2, rel=1e-9)
    assert fit.resid_std == pytest.approx(math.sqrt(float(resid @ resid) / (len(depths) - 2)), rel=1e-9)
    assert fit.worst_residual == pytest.approx(float(np.abs(resid).max()), rel=1e-9)
    loo = 0.0
    for i in range(len(depths)):
        keep = [j for j in range(len(depths)) if j != i]
        b, a = np.polyfit(np.asarray(depths)[keep], np.asarray(values)[keep], 1)
        loo = max(loo, abs(values[i] - (a + b * depths[i])) / abs(values[i]))
    assert fit.loo_error_rel == pytest.approx(loo, rel=1e-9)
    # The textbook 95% prediction interval for a new observation, with scipy's quantile.
    n, xm = len(depths), float(np.mean(depths))
    sxx = float(((np.asarray(depths) - xm) ** 2).sum())
    for x in (depths[0], 20, 60):
        want = stats.t.ppf(0.975, n - 2) * fit.resid_std * math.sqrt(1 + 1 / n + (x - xm) ** 2 / sxx)
        assert fit.half_width(x) == pytest.approx(want, rel=3e-4)
