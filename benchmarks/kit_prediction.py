"""Does a device kit, run where nothing of ours is installed, predict depths it did not measure? (issue 10)

For each spec: make an ONNX Runtime kit of this machine (fp32, 1 thread, batch 1, depths 1, 6, 12) with
``tleg_deploy.profile.kit.build_kit``, run its ``run.sh`` with a *fresh* virtual environment holding only
``onnxruntime`` and ``numpy`` (and their own dependencies; the script checks that neither torch nor tleg_deploy
imports there), import the results (``profile.kit_import.import_kit``), then time depths 3, 8 and 10 (which the
kit did not measure) and 6 (which it did: the control for drift between the kit's run and the check) in 3
independent sessions of the profiler's protocol in this process (4 depths interleaved per session), and
compare the kit profile's prediction with the median of the 3 sessions. Target: the 3 unmeasured depths
within ±10%.

    .venv/bin/python benchmarks/kit_prediction.py                    # makes /tmp/tleg-kit-venv once
    .venv/bin/python benchmarks/kit_prediction.py --python PATH      # a kit python you already have
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import spec_names, write_result  # also puts the repository root on sys.path

from tleg_deploy.profile.env import conditions

KIT_DEPTHS = (1, 6, 12)
UNMEASURED = (3, 8, 10)
CONTROL = 6
SESSIONS = 3
VENV = Path(tempfile.gettempdir()) / "tleg-kit-venv"


def fresh_python(path: str | None) -> tuple[str, list[str]]:
    """The kit's interpreter (made once: a venv with only onnxruntime and numpy, this venv's versions) and its
    ``pip freeze``; refuses one where torch or tleg_deploy imports."""
    import numpy
    import onnxruntime

    if path is None:
        py = VENV / "bin" / "python"
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run([str(py), "-m", "pip", "install", "-q", f"onnxruntime=={onnxruntime.__version__}",
                            f"numpy=={numpy.__version__}"], check=True)
        path = str(py)
    for mod in ("torch", "tleg_deploy"):
        probe = subprocess.run([path, "-c", f"import {mod}"], capture_output=True, cwd=tempfile.gettempdir(),
                               check=False)
        if probe.returncode == 0:
            raise SystemExit(f"{path} can import {mod}: the kit must run without it")
    freeze = subprocess.run([path, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout.split()
    return path, freeze


def run_spec(name: str, python: str) -> dict[str, Any]:
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile.config import MeasureConfig
    from tleg_deploy.profile.kit import KitConfig, build_kit
    from tleg_deploy.profile.kit_import import import_kit
    from tleg_deploy.profile.measure import measure_points

    spec = ViTSpec.preset(name)
    lg = load_learngene("demo") if name == "digits" else None
    start = conditions()
    with tempfile.TemporaryDirectory(prefix="tleg-kit-bench-") as tmp:
        kit = build_kit(spec, KitConfig("box", MeasureConfig(depths=KIT_DEPTHS, memory=False)), Path(tmp) / "kit",
                        learngene=lg)
        t0 = time.perf_counter()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        proc = subprocess.run(["sh", str(kit / "run.sh")], env={**env, "KIT_PYTHON": python}, cwd=tmp,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"run.sh failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        kit_s = time.perf_counter() - t0
        prof = import_kit(kit, name="box")
    depths = tuple(sorted((*UNMEASURED, CONTROL)))
    sessions = []
    for i in range(SESSIONS):
        cfg = MeasureConfig(depths=depths, memory=False, seed=i + 1)
        sessions.append({p.depth: p.p50_ms for p in measure_points(spec, cfg, "fp32", learngene=lg)})
        print(f"[{name}] check session {i + 1}: " + ", ".join(f"{d}: {ms:.4g} ms" for d, ms in sessions[-1].items()),
              flush=True)
    rows = []
    for d in depths:
        pred = prof.predict(d, spec=spec, precision="fp32")
        med = statistics.median(s[d] for s in sessions)
        rows.append({"depth": d, "measured_by_kit": d in KIT_DEPTHS, "predicted_p50_ms": pred.latency_p50_ms,
                     "predicted_upper_ms": pred.latency_p50_upper_ms, "check_p50_ms": [s[d] for s in sessions],
                     "check_median_ms": med, "rel_error": (pred.latency_p50_ms - med) / med})
    fit = prof.entries[0].fit.latency_p50
    unmeasured = [r for r in rows if not r["measured_by_kit"]]
    return {"spec": name, "rows": rows, "kit_seconds": kit_s, "within_10pct": sum(abs(r["rel_error"]) <= 0.10
                                                                                   for r in unmeasured),
            "n_unmeasured": len(unmeasured), "fit": {"intercept_ms": fit.intercept, "slope_ms": fit.slope,
                                                     "r2": fit.r2},
            "kit_environment": {k: prof.environment.get(k) for k in ("cpu", "onnxruntime", "python", "numpy")
                                if k in prof.environment},
            "conditions": {"start": start, "end": conditions()}}


def markdown(results: list[dict[str, Any]], freeze: list[str]) -> str:
    lines = [
        "## Device kit: predicting depths it did not measure (issue 10)",
        "",
        f"`benchmarks/kit_prediction.py`: an ONNX Runtime kit of this machine (fp32, 1 thread, batch 1, depths "
        f"{', '.join(map(str, KIT_DEPTHS))}) run by its `run.sh` with a fresh venv holding only "
        f"`{' '.join(freeze)}` (torch and tleg_deploy do not import there), imported with `profile --from-kit`'s "
        f"code; then depths {', '.join(map(str, UNMEASURED))} (not measured by the kit) and {CONTROL} (measured: "
        f"the drift control) timed in {SESSIONS} independent in-process sessions of the profiler's protocol, 4 "
        "depths interleaved per session; *error* = kit prediction vs the median of the sessions. "
        "Target: the 3 unmeasured depths within ±10%.",
        "",
        "| spec | depth | measured by kit | kit predicts p50 ms | check sessions ms | median ms | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for row in r["rows"]:
            lines.append(
                f"| {r['spec']} | {row['depth']} | {'yes (control)' if row['measured_by_kit'] else 'no'} | "
                f"{row['predicted_p50_ms']:.4g} | {', '.join(f'{x:.4g}' for x in row['check_p50_ms'])} | "
                f"{row['check_median_ms']:.4g} | {row['rel_error']:+.1%} |")
    lines.append("")
    for r in results:
        load = [r["conditions"][k].get("load_average") for k in ("start", "end")]
        lines.append(f"- {r['spec']}: **{r['within_10pct']}/{r['n_unmeasured']} unmeasured depths within ±10%**; "
                     f"kit run took {r['kit_seconds']:.0f} s; load average (1 min) "
                     f"{load[0][0] if load[0] else 'n/a'} / {load[1][0] if load[1] else 'n/a'} at start / end on "
                     f"{os.cpu_count()} cores")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", type=spec_names, default="deit-tiny,digits")
    ap.add_argument("--python", help="the kit's python (default: a fresh venv at /tmp/tleg-kit-venv)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args()
    python, freeze = fresh_python(args.python)
    results = [run_spec(s, python) for s in args.specs]
    text = markdown(results, freeze)
    print(text)
    if not args.no_write:
        write_result("kit_prediction", {"results": results, "kit_python_freeze": freeze}, text)


if __name__ == "__main__":
    main()
