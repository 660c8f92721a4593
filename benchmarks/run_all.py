"""Run every benchmark script in order, regenerate benchmarks/RESULTS.md, then build the report.

    .venv/bin/python benchmarks/run_all.py               # what `make bench` runs
    .venv/bin/python benchmarks/run_all.py --dry-run     # the plan and its expected duration only
    .venv/bin/python benchmarks/run_all.py --only solver,export_family --no-report

Each script writes ``benchmarks/results/<name>.json`` and ``.md`` (benchmarks/_results.py). The wall
time of every script is recorded in ``benchmarks/results/run_all.json``; the expected duration printed
before a run comes from there (the last run on this machine), or from a benchmark's own recorded wall
time, else it is shown as unknown. A failing script does not stop the others; the exit code is 1 if any
failed. Finally ``tleg-deploy report`` is built into ``benchmarks/report/`` for the host (measured on
first use) and every shipped device profile.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
TIMINGS = RESULTS / "run_all.json"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from make_results import ORDER, build  # noqa: E402


def _fmt(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def recorded_seconds() -> dict[str, float]:
    """Wall seconds per script from the last run_all (else a benchmark's own ``wall_seconds``, at the top of its
    results or in their summary)."""
    out: dict[str, float] = {}
    for name in ORDER:
        try:
            data = json.loads((RESULTS / f"{name}.json").read_text())
            summary = data.get("summary")
            wall = data.get("wall_seconds", summary.get("wall_seconds") if isinstance(summary, dict) else None)
            if isinstance(wall, (int, float)):
                out[name] = float(wall)
        except (OSError, ValueError):
            pass
    try:
        runs = json.loads(TIMINGS.read_text()).get("scripts", {})
        out |= {k: float(v["seconds"]) for k, v in runs.items() if v.get("ok") and "seconds" in v}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return out


def expected_line(names: list[str], known: dict[str, float]) -> str:
    have = [n for n in names if n in known]
    lacking = [n for n in names if n not in known]
    if not names:
        return "expected duration: nothing to run"
    if not have:
        return ("expected duration: unknown until the first run on this machine (paper_claims, which fine-tunes "
                "hundreds of small models, dominates); each script's time is recorded in " + str(TIMINGS.name))
    total = sum(known[n] for n in have)
    parts = [f"{n} ~{_fmt(known[n])}" for n in have] + [f"{n} unknown (not timed yet)" for n in lacking]
    head = f"expected duration: ~{_fmt(total)}" + (" plus the untimed scripts" if lacking else "")
    return f"{head} ({'; '.join(parts)}), from the last recorded run on this machine"


def run_script(name: str) -> tuple[bool, float]:
    script = HERE / f"{name}.py"
    print(f"\n=== {name}: {sys.executable} {script.relative_to(ROOT)} ===", flush=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, check=False)
    return proc.returncode == 0, time.perf_counter() - t


def save_timings(timings: dict[str, dict[str, Any]]) -> None:
    from tleg_deploy.files.fileio import write_json_atomic

    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        previous = json.loads(TIMINGS.read_text()).get("scripts", {})
    previous.update(timings)
    write_json_atomic(TIMINGS, {"benchmark": "run_all", "updated": dt.datetime.now(dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"), "python": sys.executable, "scripts": previous})


def build_report(out_dir: Path) -> None:
    from tleg_deploy.profile.registry import list_profiles
    from tleg_deploy.report import ReportConfig, build_report

    devices = ("host", *(p.name for p in list_profiles() if p.name != "host"))
    # the learngene paper_claims trained: the shipped demo where this CPU reproduces it bitwise, else its copy
    kept = RESULTS / "paper_claims.learngene.safetensors"
    learngene = str(kept.relative_to(ROOT)) if kept.is_file() else "demo"
    print(f"\n=== report: {out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir} "
          f"(devices: {', '.join(devices)}; learngene: {learngene}) ===", flush=True)
    with contextlib.chdir(ROOT):  # the report names its inputs relative to the repository, wherever it is
        res = build_report(ReportConfig(out_dir=out_dir, devices=devices, results_dir=RESULTS.relative_to(ROOT),
                                        learngene=learngene),
                           progress=lambda msg: print(f"  {msg}…", flush=True), quiet=False)
    print(f"wrote {res.html} ({len(res.figures)} figures)")
    for section, cmd in res.missing.items():
        print(f"  no data for {section}: {cmd}")


def main() -> int:
    ap = argparse.ArgumentParser(description="Run every benchmark, regenerate RESULTS.md and the report.")
    ap.add_argument("--only", default="", help=f"comma list of benchmarks (default all: {','.join(ORDER)})")
    ap.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and expected duration, run nothing")
    ap.add_argument("--report", type=Path, default=HERE / "report", help="where to build the report")
    ap.add_argument("--no-report", action="store_true", help="do not build the report")
    args = ap.parse_args()
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    unknown = sorted((set(only) | skip) - set(ORDER))
    if unknown:
        print(f"error: unknown benchmark {unknown[0]!r} (known: {', '.join(ORDER)})", file=sys.stderr)
        return 2
    names = [n for n in ORDER if (not only or n in only) and n not in skip]
    print(f"benchmarks: {', '.join(names) or '(none)'}")
    print(expected_line(names, recorded_seconds()), flush=True)
    if args.dry_run:
        return 0
    timings: dict[str, dict[str, Any]] = {}
    failed: list[str] = []
    try:
        for name in names:
            ok, seconds = run_script(name)
            timings[name] = {"seconds": round(seconds, 1), "ok": ok,
                             "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
            print(f"=== {name}: {'ok' if ok else 'FAILED'} in {_fmt(seconds)} ===", flush=True)
            if not ok:
                failed.append(name)
    finally:
        if timings:
            save_timings(timings)
    print(f"\nregenerated {build()}")
    if not args.no_report:
        build_report(args.report.resolve())
    total = sum(t["seconds"] for t in timings.values())
    print(f"\nall done in {_fmt(total)}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
