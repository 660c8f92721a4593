"""How long does the test suite take on this machine? (issue 13: target <= 60 s on 2 cores)

Runs ``python -m pytest -p no:cacheprovider`` (what ``make test`` runs after its setup, lint and
best-effort packages; pyproject's addopts spread it over one pytest-xdist worker per core) once,
records the wall time, the pass/skip counts, the slowest tests and the load average, and writes the
RESULTS.md section.

    .venv/bin/python benchmarks/test_suite_time.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from _results import write_result

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 60.0


def main() -> None:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=10"],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    out = proc.stdout
    summary = next((ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", ln)), "")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    slowest = re.findall(r"^([\d.]+)s (?:call|setup|teardown)\s+(\S+)$", out, flags=re.M)[:10]
    data = {"wall_seconds": wall, "returncode": proc.returncode, "counts": counts, "summary": summary,
            "slowest": [{"seconds": float(s), "test": t} for s, t in slowest],
            "failed": re.findall(r"^FAILED (\S+)", out, flags=re.M),
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "target_seconds": TARGET_S}
    lines = [
        "## Test suite duration (issue 13)",
        "",
        "`benchmarks/test_suite_time.py`: `python -m pytest` (the suite `make test` runs, after setup and lint; "
        f"`-n auto`: {os.cpu_count()} pytest-xdist workers, one per core), "
        f"one run on this machine, {os.cpu_count()} cores, load average {data['load_average'][0]} / "
        f"{data['load_average'][1]} at start / end.",
        "",
        f"- **{wall:.0f} s** wall ({summary.strip('= ')}); target <= {TARGET_S:.0f} s: "
        f"{'met' if wall <= TARGET_S and proc.returncode == 0 else 'NOT met'}",
        f"- the 10 slowest (time inside their worker): {sum(float(s) for s, _ in slowest):.0f} s together: "
        + "; ".join(f"{t.split('::')[-1]} {float(s):.0f} s" for s, t in slowest),
    ]
    if data["failed"]:
        lines.append(f"- failed: {', '.join(data['failed'])}")
    print("\n".join(lines))
    if proc.returncode != 0:
        print(out[-6000:])
    write_result("test_suite_time", data, "\n".join(lines))
    sys.exit(0 if proc.returncode == 0 else 1)


if __name__ == "__main__":
    main()
