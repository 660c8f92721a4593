"""The ONNX Runtime runner shipped inside a device kit (``tleg_deploy.profile.kit``): one file that
needs only ``python3`` (3.8+), ``numpy`` and ``onnxruntime`` on the target, never torch and never
``tleg_deploy`` (a test checks its imports).

It follows the profiler's protocol (``tleg_deploy.profile.timing`` and ``runners.ort_session``):
a session per file with fixed intra-op threads (1 by default), one inter-op thread, spinning off,
``ORT_ENABLE_ALL``; warm-up, repetitions per round from the warm-up time, *interleaved rounds*
over the depths of a precision in a shuffled order (one untimed call after switching models),
extra rounds (bounded) while a depth's p50 is unsettled, and a session whose medians are off a line
by more than the tolerance is measured again (bounded, and only until a session repeats an earlier
one's medians up to one factor, within the tolerance) and the most linear one kept. Peak memory is
the resident set above the baseline of a fresh interpreter per point (Linux ``VmHWM`` after
``clear_refs``; elsewhere ``ru_maxrss``), as ``tleg_deploy.profile.memory`` takes it.

It writes raw per-round times, not statistics: the importer computes them, so an edited summary
cannot pass. Usage (``run.sh`` calls it): ``python3 kit_runner.py KIT_DIR RESULTS_DIR``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time

RESULTS_FORMAT = "tleg-kit-results"
RESULTS_SCHEMA = 1


def log(msg: str) -> None:
    sys.stderr.write(f"[kit] {msg}\n")
    sys.stderr.flush()


def ort_session(path: str, threads: int):  # noqa: ANN201 (onnxruntime may be absent where this is linted)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])


class Runner:
    """One timed inference per call, in ms: wall clock (``perf_counter_ns``), or with ``clock="thread"``
    the timing thread's CPU time (the profiler's diagnostic for a shared machine, 1 thread only)."""

    def __init__(self, path: str, shape: list, threads: int, clock: str = "wall") -> None:
        import numpy as np

        self.clock = time.thread_time_ns if clock == "thread" else time.perf_counter_ns
        self.session = ort_session(path, threads)
        self.feed = {"pixel_values": np.random.default_rng(0).standard_normal(tuple(shape), dtype=np.float32)}

    def __call__(self) -> float:
        t0 = self.clock()
        self.session.run(None, self.feed)
        return (self.clock() - t0) / 1e6


def percentile(xs: list, q: float) -> float:
    s = sorted(xs)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _se(values: list) -> float:
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0


def time_rounds(runners: dict, p: dict) -> dict:
    """``{depth: [[ms, ...] per round]}``: warm-up, interleaved rounds, extra rounds while unsettled."""
    reps = {}
    for depth, run in runners.items():
        warm = [run() for _ in range(max(p["warmup"], 1))]
        per_call_s = min(warm) / 1e3
        reps[depth] = max(p["min_reps"], min(p["max_reps"], round(p["round_seconds"] / max(per_call_s, 1e-6))))
    rounds: dict = {d: [] for d in runners}
    rng = random.Random(p["seed"])
    order = list(runners)
    for r in range(p["rounds"] + p["extra_rounds"]):
        if r >= p["rounds"] and all(
            _se([statistics.median(x) for x in rounds[d]])
            <= p["settle_rel_se"] * statistics.median([statistics.median(x) for x in rounds[d]]) for d in runners
        ):
            break
        rng.shuffle(order)
        for depth in order:
            runners[depth]()  # untimed: the first call after another model finds its weights evicted
            rounds[depth].append([runners[depth]() for _ in range(reps[depth])])
        log(f"round {r + 1} of {p['rounds']}+ done")
    return rounds


def worst_line_residual(depths: list, values: list) -> float:
    """Worst |y - line| / y of the least-squares line through the points (0 with fewer than 3)."""
    if len(depths) < 3:
        return 0.0
    xm, ym = statistics.fmean(depths), statistics.fmean(values)
    sxx = sum((x - xm) ** 2 for x in depths)
    slope = sum((x - xm) * (y - ym) for x, y in zip(depths, values)) / sxx  # noqa: B905 (3.8)
    return max(abs(y - (ym + slope * (x - xm))) / y for x, y in zip(depths, values))  # noqa: B905


def same_curve(a: dict, b: dict, tolerance: float) -> bool:
    """The per-depth medians ``a`` are ``b`` times one factor (a machine's speed moves by a few percent
    between sessions), within ``tolerance``: the largest depth-wise ratio over the smallest. The profiler
    (``tleg_deploy.profile.measure``) ends its re-measures by the same rule."""
    ratios = [a[d] / b[d] for d in a if d in b and b[d] > 0]
    return bool(ratios) and len(ratios) == len(a) and min(ratios) > 0 and max(ratios) <= (1 + tolerance) * min(ratios)


def measure_precision(kit_dir: str, kit: dict, precision: str) -> dict:
    """The most linear of up to ``1 + retries`` sessions (fewer once a session repeats an earlier one's medians):
    ``{depth: rounds}`` and the set-aside residuals. With ``alone`` in the protocol, each depth is timed in its own
    session instead (``fit --ssh``'s search: as a deployment runs one model)."""
    p = kit["protocol"]
    shape = [kit["batch"], kit["spec"]["in_chans"], kit["spec"]["img_size"], kit["spec"]["img_size"]]
    files = {a["depth"]: os.path.join(kit_dir, a["file"]) for a in kit["artifacts"] if a["precision"] == precision}
    if p.get("alone"):  # each depth in its own session, as deployed: no line through them, nothing re-measured
        rounds = {}
        for d in sorted(files):
            runner = Runner(files[d], shape, kit["threads"], p.get("clock", "wall"))
            rounds.update(time_rounds({d: runner}, p))
            del runner
        return {"rounds": rounds, "rejected": []}
    sessions: list = []
    medians: list = []
    tol = p["linear_tolerance"]
    for attempt in range(1 + p["retries"]):
        runners = {d: Runner(files[d], shape, kit["threads"], p.get("clock", "wall")) for d in sorted(files)}
        rounds = time_rounds(runners, p)
        del runners
        depths = sorted(rounds)
        median = {d: statistics.median([t for r in rounds[d] for t in r]) for d in depths}
        worst = worst_line_residual(depths, [median[d] for d in depths])
        # a curve that an earlier session repeats (up to one factor) is the device's own (cache effects), not a
        # burst of load: measuring again would only repeat it
        reproduced = any(same_curve(median, m, tol) for m in medians)
        sessions.append((worst, rounds))
        medians.append(median)
        if worst <= tol or reproduced or attempt == p["retries"]:
            break
        log(f"{precision}: medians off a line by {worst:.0%}, measuring again ({attempt + 2}/{1 + p['retries']})")
    best = min(range(len(sessions)), key=lambda i: sessions[i][0])
    return {"rounds": sessions[best][1], "rejected": [w for i, (w, _) in enumerate(sessions) if i != best]}


# ---------------------------------------------------------------------------------------------
# Peak memory, in a fresh interpreter per point


def _status_bytes(field: str):  # noqa: ANN202
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _maxrss_bytes() -> int:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def memory_probe(path: str, shape: list, threads: int) -> float:
    """Child side: peak resident MB above the baseline taken after numpy and onnxruntime are imported."""
    import numpy as np
    import onnxruntime  # noqa: F401  (the library is not the model's memory)

    proc = _status_bytes("VmRSS") is not None
    if proc:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            proc = False
    base = _status_bytes("VmRSS") if proc else _maxrss_bytes()
    x = np.random.default_rng(0).standard_normal(tuple(shape), dtype=np.float32)
    sess = ort_session(path, threads)
    for _ in range(3):
        sess.run(None, {"pixel_values": x})
    peak = _status_bytes("VmHWM") if proc else _maxrss_bytes()
    return max((peak or 0) - (base or 0), 0) / 1e6


def peak_memory_mb(path: str, shape: list, threads: int) -> float:
    import subprocess

    args = [sys.executable, os.path.abspath(__file__), "--memory-probe", path, json.dumps(shape), str(threads)]
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"memory probe of {os.path.basename(path)} failed: {tail}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"])


# ---------------------------------------------------------------------------------------------
# Environment and main


def environment(threads: int) -> dict:
    import numpy
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model"):
                    cpu = value.strip()
                    break
    except OSError:
        pass
    env = {"cpu": cpu, "cores": os.cpu_count(), "os": platform.platform(), "machine": platform.machine(),
           "python": platform.python_version(), "threads": threads,
           "libraries": {"onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__},
           "providers": onnxruntime.get_available_providers()}
    with contextlib.suppress(OSError, AttributeError):
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return env


def main(argv: list) -> int:
    if len(argv) == 4 and argv[0] == "--memory-probe":
        print(json.dumps({"peak_mb": memory_probe(argv[1], json.loads(argv[2]), int(argv[3]))}))
        return 0
    if len(argv) != 2:
        sys.stderr.write("usage: python3 kit_runner.py KIT_DIR RESULTS_DIR\n")
        return 2
    kit_dir, results_dir = argv
    with open(os.path.join(kit_dir, "kit.json")) as f:
        kit = json.load(f)
    shape = [kit["batch"], kit["spec"]["in_chans"], kit["spec"]["img_size"], kit["spec"]["img_size"]]
    points, rejected = [], {}
    repeats = int(kit["protocol"].get("repeats", 1))
    for repeat in range(repeats):  # the whole measurement again, each a fresh session (read as successive timings)
        for precision in kit["precisions"]:
            of = f" (repeat {repeat + 1} of {repeats})" if repeats > 1 else ""
            log(f"{precision}: timing depths {', '.join(map(str, kit['depths']))}{of}")
            session = measure_precision(kit_dir, kit, precision)
            rejected.setdefault(precision, []).extend(session["rejected"])
            for a in kit["artifacts"]:
                if a["precision"] != precision:
                    continue
                memory = None
                if kit["protocol"]["memory"] and repeat == 0:
                    log(f"{precision}: peak memory of depth {a['depth']}")
                    memory = peak_memory_mb(os.path.join(kit_dir, a["file"]), shape, kit["threads"])
                points.append({"precision": precision, "depth": a["depth"], "repeat": repeat,
                               "rounds": session["rounds"][a["depth"]], "memory_mb": memory})
    result = {"format": RESULTS_FORMAT, "schema_version": RESULTS_SCHEMA, "kit_id": kit["kit_id"],
              "backend": "onnxruntime", "environment": environment(kit["threads"]), "points": points,
              "rejected_sessions": rejected,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = os.path.join(results_dir, "onnxruntime.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
