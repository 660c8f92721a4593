"""How long ``expand(lg, depth)`` takes for the DeiT presets: the target is under a second for
deit-base at depth 12 (86 M parameters, 340 MB), i.e. expansion is never the slow step of a deploy.

    .venv/bin/python benchmarks/expansion_speed.py

Moved here from the test suite: a wall-clock bound is a property of the machine, not of the code.
The first expansion of each spec pays the page faults of a fresh 340 MB and is not counted; each
figure is the best and the median of ``REPEATS`` steady-state runs. Writes
``benchmarks/results/expansion_speed.{json,md}``.
"""

from __future__ import annotations

import statistics
import time

import torch
from _results import write_result

from tleg_deploy.model.expansion import expand
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec

CASES = (("deit-tiny", 12), ("deit-small", 12), ("deit-base", 12), ("deit-base", 24))
REPEATS = 5
TARGET_S = 1.0  # deit-base at depth 12


def time_expand(lg: Learngene, depth: int) -> tuple[list[float], int]:
    """Steady-state wall times of ``REPEATS`` expansions, and the model's parameter count."""
    warm = expand(lg, depth)  # first touch of the memory, not counted
    params = sum(p.numel() for p in warm.parameters())
    del warm
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        model = expand(lg, depth)
        times.append(time.perf_counter() - start)
        del model
    return times, params


def main() -> None:
    rows = []
    for preset, depth in CASES:
        lg = Learngene.init(ViTSpec.preset(preset), 12, seed=0)
        times, params = time_expand(lg, depth)
        rows.append({"spec": preset, "depth": depth, "params": params, "best_s": min(times),
                     "median_s": statistics.median(times), "times_s": times})
        print(f"{preset} depth {depth}: best {min(times):.3f} s, median {statistics.median(times):.3f} s")
    base12 = next(r for r in rows if r["spec"] == "deit-base" and r["depth"] == 12)
    met = base12["median_s"] < TARGET_S  # judged on the median: a best-of-N hides a slow machine
    lines = ["## Expansion speed", "",
             f"`benchmarks/expansion_speed.py`: wall time of `expand(lg, depth)` (best and median of {REPEATS} runs "
             f"after one warm-up, torch threads {torch.get_num_threads()}). Target: deit-base at depth 12 under "
             f"{TARGET_S:.0f} s, judged on the median — **{'met' if met else 'missed'}** "
             f"({base12['median_s']:.3f} s median, {base12['best_s']:.3f} s best).", "",
             "| spec | depth | params | best | median |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['spec']} | {r['depth']} | {r['params'] / 1e6:.1f} M | {r['best_s']:.3f} s "
              f"| {r['median_s']:.3f} s |" for r in rows]
    write_result("expansion_speed", {"target_s": TARGET_S, "target_met": met, "repeats": REPEATS,
                                     "threads": torch.get_num_threads(), "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
