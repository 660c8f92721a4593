"""benchmarks/noise_ceiling.py's oracle and counting, on made-up latencies (no timing): a judge that agrees with
what the oracle knows gives both targets in every draw; a judge that reads some depths slower breaks them where, and
only where, it should; a safety margin trades within-budget misses for next-deeper ones."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def ceiling(benchmarks_importable: Path) -> ModuleType:
    return importlib.import_module("noise_ceiling")


LATENCY = {d: 1.0 + 0.1 * d for d in range(1, 17)}  # ms, 10% of depth 0's cost per block


def test_the_oracle_picks_the_deepest_depth_it_knows_under_the_budget(ceiling: ModuleType) -> None:
    assert ceiling.oracle(LATENCY, LATENCY, 1.75, 0.0) == (True, True)  # depth 7 (1.7) within, 8 (1.8) over
    slower = {**LATENCY, 7: 1.8}  # the judge reads the pick over the budget
    assert ceiling.oracle(LATENCY, slower, 1.75, 0.0) == (False, True)
    faster = {**LATENCY, 8: 1.74}  # ... or the next deeper one within it
    assert ceiling.oracle(LATENCY, faster, 1.75, 0.0) == (True, False)
    # a 3% margin keeps depth 7 out (1.7 > 1.75 * 0.97): depth 6 is within, and so is depth 7 for the judge
    assert ceiling.oracle(LATENCY, LATENCY, 1.75, 0.03) == (True, False)
    assert ceiling.oracle(LATENCY, LATENCY, 1.0, 0.0) == (False, True)  # nothing fits: a within-budget miss


def test_draws_count_both_targets_over_budget_grids(ceiling: ModuleType) -> None:
    split = {"a": (LATENCY, LATENCY), "b": (LATENCY, LATENCY)}
    phases = [[0.13, 0.61], [0.37, 0.89]]
    agreed = ceiling.draws(split, 0.0, phases, 10)
    assert agreed == {"margin": 0.0, "met": 4, "draws": 4, "within_mean": 20.0, "tight_mean": 20.0}
    # a judge reading every depth 4% slower: the budgets between a depth's known and judged latency miss
    slow = {d: ms * 1.04 for d, ms in LATENCY.items()}
    missed = ceiling.draws({"a": (LATENCY, slow), "b": (LATENCY, slow)}, 0.0, phases, 10)
    assert missed["within_mean"] < 20 and missed["met"] < 4
    # ... and a 5% margin buys those back at the next deeper depth's expense
    safe = ceiling.draws({"a": (LATENCY, slow), "b": (LATENCY, slow)}, 0.05, phases, 10)
    assert safe["within_mean"] > missed["within_mean"] and safe["tight_mean"] < agreed["tight_mean"]


def test_judges_split_rounds_two_ways(ceiling: ModuleType) -> None:
    reps = {1: [1.0, 2.0, 3.0, 4.0], 2: [5.0, 6.0, 7.0, 8.0]}
    ways = ceiling.judges(reps, 2)
    assert ways["interleaved"] == ({1: 2.0, 2: 6.0}, {1: 3.0, 2: 7.0})  # rounds 0, 2 against 1, 3
    assert ways["in turn"] == ({1: 1.5, 2: 5.5}, {1: 3.5, 2: 7.5})  # rounds 0, 1 against 2, 3
