"""fit --ssh's measured loop under the rules it has had, side by side (issue 10).

``fit --ssh`` measures each depth its search asks for with device kits run on the target. The rules:

- ``shipped``: each depth of a kit timed in its own session, as deployed (``KitConfig.alone``); a reading within
  5% of the budget (and the pick read within 15% under it) timed afresh 3-8 times by running that depth's kit
  again, until the median's one-sided 95% t bound clears the budget;
- ``interleaved kits``: the same, with the kit's 2-3 depths interleaved round by round in one session, as a
  profile is measured (5a6a12a to 5474bbe);
- ``one reading``: interleaved kits, and each depth's first reading replayed when it is asked for again (the SSH
  timer before 5a6a12a: no fresh timing).

This script runs them on the same budgets, over a private
sshd on 127.0.0.1 (``benchmarks/_sshd.py``; the target is this machine, the kits' runner this interpreter), on
one host profile per spec (ONNX Runtime CPU, 1 intra-op thread, after the drift probe) and p90 budgets spread as
``solver.py`` spreads them, the rules in a shuffled order per budget; then every depth any rule picked, and
the next deeper one, is re-timed as deployed (each model alone in its session, ``solver.remeasure``: 5
alternating sessions, one judge for all rules), and each pick is counted within / tight against those medians.

    .venv/bin/python benchmarks/ssh_loop.py [--budgets-per-spec 6] [--specs digits,deit-tiny]

Noise decides single budgets: compare the rules within one run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import solver  # type: ignore[import-not-found]
from _results import spec_names, write_result  # type: ignore[import-not-found]
from _sshd import SSHD, loopback_sshd  # type: ignore[import-not-found]

RULES = ("shipped", "interleaved kits", "one reading")


def one_reading(timer: Callable[[int], Any]) -> Callable[[int], Any]:
    """``timer`` as the SSH timer was before 5a6a12a: a depth asked for again gets its first reading back."""
    first: dict[int, Any] = {}

    def timed(depth: int) -> Any:
        if depth not in first:
            first[depth] = timer(depth)
        return first[depth]

    return timed


def run_spec(name: str, n_budgets: int, run: Any, workdir: Path) -> list[dict[str, Any]]:
    from tleg_deploy.deploy.fit_measure import measured_check, ssh_timer
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.errors import InfeasibleError
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.plan.solve import Budget, solve
    from tleg_deploy.profile.config import MeasureConfig
    from tleg_deploy.profile.drift import probe_and_apply

    spec = ViTSpec.preset(name)
    lg = load_learngene("demo") if name == "digits" else None
    prof = probe_and_apply(solver.host_profile(spec, False), log=lambda m: print(f"[{name}] {m}", flush=True))
    budgets = solver.spread_budgets(prof, spec, n_budgets)
    cfg = MeasureConfig(threads=1, rounds=7, round_seconds=0.15, memory=False)
    arts = solver.Artifacts(spec, workdir)
    rows = []
    for i, b in enumerate(budgets):
        budget = Budget(latency_ms=math.ceil(b * 1e4) / 1e4)
        plan = solve(prof, budget, spec=spec, max_depth=24)
        request = FitRequest(budget, device=prof, out_dir=Path("unused"), search=SearchOptions(max_depth=24))
        order = list(RULES)
        random.Random(i).shuffle(order)
        picks: dict[str, dict[str, Any]] = {}
        for rule in order:
            said: list[str] = []
            t0 = time.perf_counter()
            with contextlib.ExitStack() as kits:
                timer = ssh_timer(lg, plan, prof, run, said.append, kits, alone=rule == "shipped")
                try:
                    depth, *_ = measured_check(request, plan, prof, budget.latency_ms,
                                               one_reading(timer) if rule == "one reading" else timer, said.append)
                except InfeasibleError:
                    depth = None
            picks[rule] = {"depth": depth, "seconds": time.perf_counter() - t0,
                           "kit_runs": sum(s.startswith("[kit] done: results/") or "done: results/" in s
                                           for s in said),
                           "kits_made": sum("making the onnxruntime kit" in s for s in said)}
        judge = solver.SessionTimer(arts, plan.precision, cfg)
        judged = sorted({x for p in picks.values() if p["depth"] is not None for x in (p["depth"], p["depth"] + 1)})
        med = {d: statistics.median(v) for d, v in solver.remeasure(judge, judged).items()}
        for p in picks.values():
            d = p["depth"]
            p.update(within=d is not None and med[d] <= budget.latency_ms,
                     tight=d is not None and med[d + 1] > budget.latency_ms)
        rows.append({"spec": name, "budget_ms": budget.latency_ms, "precision": plan.precision,
                     "remeasured_p90_ms": med, "rules": picks})
        print(f"[{name}] budget {budget.latency_ms:.4g} ms: " + "; ".join(
            f"{rule} depth {p['depth']} ({p['kit_runs']} kit runs, {p['seconds']:.0f} s)"
            f"{'' if p['within'] else ' OVER'}{'' if p['tight'] else ' deeper-within'}"
            for rule, p in picks.items()), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    n = len(rows)
    lines = [
        "## fit --ssh: the measured loop's rules side by side (issue 10)",
        "",
        "`benchmarks/ssh_loop.py`: fit's measured loop over SSH (a private sshd on 127.0.0.1; the target is this "
        "machine) on a fresh host profile, p90 budgets spread as `solver.py` spreads them; per budget every rule in "
        "a shuffled order, then every picked depth and the next deeper one re-timed as deployed (each model alone "
        f"in its session, {solver.REMEASURE} alternating sessions, one judge for all rules). *shipped*: each depth "
        "of a kit timed in its own session; a reading within 5% of the budget (and the pick read within 15% under "
        "it) timed afresh 3-8 times by running its kit again on the target, until the median's one-sided 95% t "
        "bound clears the budget; *interleaved kits*: the same with the kit's depths interleaved in one session "
        "(5a6a12a to 5474bbe); *one reading*: interleaved kits, each depth's first reading replayed (before "
        "5a6a12a). Single budgets are decided by noise: compare rules within this run.",
        "",
        "| rule | pick within budget | next deeper over budget | kit runs per budget (median, total) | "
        "seconds per budget (median) |",
        "|---|---|---|---|---|",
    ]
    for rule, s in summary["rules"].items():
        lines.append(f"| {rule} | {s['within']}/{n} | {s['tight']}/{n} | {s['kit_runs_median']:g}, "
                     f"{s['kit_runs_total']} | {s['seconds_median']:.1f} |")
    lines += ["", f"- load average before {summary['load_average_before']}, after {summary['load_average_after']}, "
              f"on {summary['cores']} cores; {summary['wall_seconds']:.0f} s"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (2 budgets of one spec, about 1 minute):\n"
               "  .venv/bin/python benchmarks/ssh_loop.py --specs digits --budgets-per-spec 2")
    ap.add_argument("--specs", type=spec_names, default="digits,deit-tiny")
    ap.add_argument("--budgets-per-spec", type=int, default=6)
    args = ap.parse_args()
    if not SSHD.exists():
        print(f"ssh_loop.py: skipped: {SSHD} is not installed (make sshd installs openssh-server)", file=sys.stderr)
        return 0
    from tleg_deploy.profile.remote import SshRun, SshTarget, connected

    t0, load_before = time.time(), os.getloadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tleg-ssh-loop-") as tmp:
        (Path(tmp) / "sshd").mkdir()
        with loopback_sshd(Path(tmp) / "sshd") as (target, config), \
                connected(SshRun(SshTarget.parse(target), config, sys.executable)) as run:
            for name in args.specs:
                sub = Path(tmp) / name
                sub.mkdir()
                rows += run_spec(name, args.budgets_per_spec, run, sub)
    summary = {
        "rules": {rule: {"within": sum(r["rules"][rule]["within"] for r in rows),
                         "tight": sum(r["rules"][rule]["tight"] for r in rows),
                         "kit_runs_median": statistics.median(r["rules"][rule]["kit_runs"] for r in rows),
                         "kit_runs_total": sum(r["rules"][rule]["kit_runs"] for r in rows),
                         "seconds_median": statistics.median(r["rules"][rule]["seconds"] for r in rows)}
                  for rule in RULES},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()], "cores": os.cpu_count(),
        "wall_seconds": time.time() - t0,
    }
    print(summary)
    write_result("ssh_loop", {"summary": summary, "rows": rows, "args": vars(args)}, markdown(rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
