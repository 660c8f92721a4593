"""How long does the test suite take on this machine? (issue 13: target <= 60 s on 2 cores)

Runs ``python -m pytest -p no:cacheprovider`` (what ``make test`` runs after its setup, lint and
best-effort packages; pyproject's addopts spread it over one pytest-xdist worker per core) three
times back to back (``--repeats``), holds the median wall time to the target, records every run's
time, the pass/skip counts, the slowest tests and the load average, and writes the RESULTS.md section.

    .venv/bin/python benchmarks/test_suite_time.py
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _results import write_result

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 60.0


def _run_once() -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=10"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    out = proc.stdout
    summary = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "")
    return {"wall_seconds": wall, "returncode": proc.returncode, "summary": summary.strip("= "),
            "counts": {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)},
            "slowest": [{"seconds": float(s), "test": t}
                        for s, t in re.findall(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+)$", out, flags=re.M)[:10]],
            "failed": re.findall(r"^FAILED (\S+)", out, flags=re.M),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "tail": out[-6000:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back runs; the median is held to the target")
    args = parser.parse_args()
    runs = [_run_once() for _ in range(max(args.repeats, 1))]
    walls = [r["wall_seconds"] for r in runs]
    median = statistics.median(walls)
    ok = all(r["returncode"] == 0 for r in runs)
    last = runs[-1]
    data = {"wall_seconds": median, "walls": walls, "returncode": max(r["returncode"] for r in runs),
            "counts": last["counts"], "summary": last["summary"], "slowest": last["slowest"],
            "failed": sorted({f for r in runs for f in r["failed"]}),
            "load_average": [runs[0]["load_average"][0], last["load_average"][1]], "target_seconds": TARGET_S,
            "runs": [{k: v for k, v in r.items() if k != "tail"} for r in runs]}
    lines = [
        "## Test suite duration (issue 13)",
        "",
        "`benchmarks/test_suite_time.py`: `python -m pytest` (the suite `make test` runs, after setup and lint; "
        f"`-n auto`: {os.cpu_count()} pytest-xdist workers, one per core), {len(runs)} back-to-back run(s) on this "
        f"machine, {os.cpu_count()} cores, load average {data['load_average'][0]} / {data['load_average'][1]} at "
        "start / end; each wall time includes the interpreter's start.",
        "",
        f"- **{median:.0f} s** median wall (runs: {', '.join(f'{w:.1f} s' for w in walls)}; last: {last['summary']}); "
        f"target <= {TARGET_S:.0f} s: {'met' if median <= TARGET_S and ok else 'NOT met'}"
        + (f" (max {max(walls):.1f} s)" if len(runs) > 1 else ""),
        f"- the 10 slowest of the last run (time inside their worker): "
        f"{sum(x['seconds'] for x in last['slowest']):.0f} s together: "
        + "; ".join(f"{x['test'].split('::')[-1]} {x['seconds']:.0f} s" for x in last["slowest"]),
    ]
    if data["failed"]:
        lines.append(f"- failed: {', '.join(data['failed'])}")
    print("\n".join(lines))
    if not ok:
        print(next(r["tail"] for r in runs if r["returncode"] != 0))
    write_result("test_suite_time", data, "\n".join(lines))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
