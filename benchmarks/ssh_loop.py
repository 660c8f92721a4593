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

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import loop_rules  # type: ignore[import-not-found]
from _results import write_result  # type: ignore[import-not-found]
from _sshd import loopback_sshd, sshd_missing  # type: ignore[import-not-found]

RULES = ("shipped", "interleaved kits", "one reading")


def one_reading(timer: Callable[[int], Any]) -> Callable[[int], Any]:
    """``timer`` as the SSH timer was before 5a6a12a: a depth asked for again gets its first reading back."""
    first: dict[int, Any] = {}

    def timed(depth: int) -> Any:
        if depth not in first:
            first[depth] = timer(depth)
        return first[depth]

    return timed


def ssh_rule(rule: str, run: Any, lg: Any) -> loop_rules.Rule:
    """fit's measured loop over SSH under ``rule`` (the kits it leaves on the target removed after each search);
    records the kit runs and the seconds it took."""
    from tleg_deploy.deploy.fit_measure import measured_check, ssh_timer

    def check(request: Any, plan: Any, prof: Any, _judge: Any) -> tuple[int | None, dict[str, float]]:
        said: list[str] = []
        t0 = time.perf_counter()
        with contextlib.ExitStack() as kits:
            timer = ssh_timer(lg, plan, prof, run, said.append, kits, alone=rule == "shipped")
            depth = loop_rules.picked(measured_check, request, plan, prof,
                                      one_reading(timer) if rule == "one reading" else timer, said.append)
        return depth, {"kit_runs": sum("done: results/" in s for s in said), "seconds": time.perf_counter() - t0}

    return check


def markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    return loop_rules.rules_markdown(
        "fit --ssh: the measured loop's rules side by side (issue 10)",
        "`benchmarks/ssh_loop.py`: fit's measured loop over SSH (a private sshd on 127.0.0.1; the target is this "
        "machine) on a fresh host profile, p90 budgets spread as `solver.py` spreads them; per budget every rule in "
        "a shuffled order, then every picked depth and the next deeper one re-timed as deployed (each model alone "
        f"in its session, {loop_rules.solver.REMEASURE} alternating sessions, one judge for all rules). *shipped*: "
        "each depth "
        "of a kit timed in its own session; a reading within 5% of the budget (and the pick read within 15% under "
        "it) timed afresh 3-8 times by running its kit again on the target, until the median's one-sided 95% t "
        "bound clears the budget; *interleaved kits*: the same with the kit's depths interleaved in one session "
        "(5a6a12a to 5474bbe); *one reading*: interleaved kits, each depth's first reading replayed (before "
        "5a6a12a). Single budgets are decided by noise: compare rules within this run.",
        ["kit runs per budget (median, total)", "seconds per budget (median)"], summary, len(rows),
        lambda s: f"{s['kit_runs_median']:g}, {s['kit_runs_total']:g} | {s['seconds_median']:.1f}")


def main() -> int:
    args = loop_rules.arguments(__doc__, "ssh_loop.py", 6)
    if sshd_missing("ssh_loop.py"):
        return 0
    from tleg_deploy.model.resources import load_learngene
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
                lg = load_learngene("demo") if name == "digits" else None  # deit-tiny: random weights
                rows += loop_rules.side_by_side(name, args.budgets_per_spec,
                                                {rule: ssh_rule(rule, run, lg) for rule in RULES}, sub)
    summary = loop_rules.summarize(rows, list(RULES), t0, load_before)
    print(summary)
    write_result("ssh_loop", {"summary": summary, "rows": rows, "args": vars(args)}, markdown(rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
