"""The timing protocol's statistics: warm-up, then *interleaved rounds* (each round times every
depth, in a shuffled order) so slow drift of the machine hits all depths alike, plus a few extra
rounds (bounded) while a depth's p50 is still unsettled. Per depth: p50/p90/p99/mean/std over all
runs, and the standard error of p50/p90 across rounds, which feeds the cost model's prediction
interval (``linefit``). A *runner* is anything that times one inference per call, in ms.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from typing import Protocol

from tleg_deploy.profile.config import MeasureConfig


class Runner(Protocol):
    """One timed inference per call, returning its latency in milliseconds."""

    def __call__(self) -> float: ...


def time_runners(runners: dict[int, Runner], cfg: MeasureConfig,
                 tick: Callable[[], None] | None = None) -> dict[int, dict[str, float]]:
    """Warm up, then ``cfg.rounds`` interleaved rounds over all depths (plus up to ``cfg.extra_rounds``
    while some depth's p50 has not settled, e.g. a neighbour's burst of load); statistics per depth.
    ``tick`` is called after every round."""
    reps: dict[int, int] = {}
    for depth, run in runners.items():
        warm = [run() for _ in range(max(cfg.warmup, 1))]
        per_call_s = min(warm) / 1e3
        reps[depth] = max(cfg.min_reps, min(cfg.max_reps, round(cfg.round_seconds / max(per_call_s, 1e-6))))
    samples: dict[int, list[float]] = {d: [] for d in runners}
    round_p50: dict[int, list[float]] = {d: [] for d in runners}
    round_p90: dict[int, list[float]] = {d: [] for d in runners}
    rng = random.Random(cfg.seed)
    order = list(runners)
    for r in range(cfg.rounds + cfg.extra_rounds):
        if r >= cfg.rounds and all(
            _se(round_p50[d]) <= cfg.settle_rel_se * statistics.median(round_p50[d]) for d in runners
        ):
            break
        rng.shuffle(order)
        for depth in order:
            # One untimed call after switching models: the first call after another model ran finds
            # this one's weights evicted from the caches, which a model serving back to back never
            # sees; with few reps per round it would land in the p90.
            runners[depth]()
            times = [runners[depth]() for _ in range(reps[depth])]
            samples[depth] += times
            round_p50[depth].append(statistics.median(times))
            round_p90[depth].append(percentile(times, 0.9))
        if tick is not None:
            tick()
    stats = {}
    for depth, xs in samples.items():
        k = len(round_p50[depth])
        stats[depth] = {
            "p50": statistics.median(xs), "p90": percentile(xs, 0.9), "p99": percentile(xs, 0.99),
            "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
            "rounds": k, "p50_se": _se(round_p50[depth]), "p90_se": _se(round_p90[depth]),
        }
    return stats


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, linear between order statistics (numpy's default)."""
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _se(values: Sequence[float]) -> float:
    """Standard error of the mean of per-round statistics."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
