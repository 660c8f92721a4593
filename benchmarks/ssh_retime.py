"""What does timing a depth afresh cost over SSH: a new device kit, or another run of the kit already there? (issue 10)

``fit --ssh`` times a depth read near the budget (and the pick read close under it) 3-8 more times. Each fresh
timing is another run of the kit that measured the depth, left unpacked on the target for the search
(``profile.remote.RemoteKit``). The alternative is a new kit per timing: export, tar, copy, unpack, run, fetch,
remove. This script measures both over a private sshd on 127.0.0.1 (``benchmarks/_sshd.py``; the target is this
machine, so the run itself costs the same in both), for the kit ``fit --ssh`` makes (ONNX Runtime, 1 thread, two
depths, one precision, no memory probe, no re-measure of a session off a line), in interleaved pairs: per round
a new kit, then a re-run of the kept kit (or the other way round, alternating). Wall seconds from asking to
having the points read back; medians, and the ratio new / re-run.

    .venv/bin/python benchmarks/ssh_retime.py [--rounds 5] [--specs digits,deit-tiny]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import spec_names, write_result  # also puts the repository root on sys.path
from _sshd import loopback_sshd, sshd_missing  # type: ignore[import-not-found]

CASES = {"digits": ("fp32", (8, 9)), "deit-tiny": ("int8", (9, 10))}


def run_spec(name: str, target: str, config: Path, rounds: int) -> dict[str, Any]:
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile.kit import KitConfig
    from tleg_deploy.profile.kit_import import kit_points
    from tleg_deploy.profile.remote import SshRun, SshTarget, connected, kit_on_target

    spec = ViTSpec.preset(name)
    precision, depths = CASES.get(name, ("fp32", (6, 7)))
    lg = load_learngene("demo") if name == "digits" else None
    cfg = KitConfig.for_backend("loop", "onnxruntime", (precision,), depths, threads=1, memory=False, retries=0)
    quiet = lambda _line: None  # noqa: E731
    times: dict[str, list[float]] = {"new kit": [], "re-run": []}
    with connected(SshRun(SshTarget.parse(target), config, sys.executable)) as run:
        assert run is not None
        with kit_on_target(spec, cfg, run, learngene=lg, progress=quiet) as kept:
            kept.run()  # the first run is part of measuring the depth the first time, in both ways
            size_mb = kept.tarball.stat().st_size / 1e6

            def new_kit() -> None:
                with kit_on_target(spec, cfg, run, learngene=lg, progress=quiet) as kit:
                    kit.run()
                    kit_points(kit.kit_dir)

            def re_run() -> None:  # as fit --ssh reads a rerun: the kit's files were checked on its first run
                kept.run()
                kit_points(kept.kit_dir, check_files=False)

            for r in range(rounds):
                order = [("new kit", new_kit), ("re-run", re_run)]
                for label, fn in order if r % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - t0)
                print(f"[{name}] round {r + 1}/{rounds}: new kit {times['new kit'][-1]:.2f} s, re-run "
                      f"{times['re-run'][-1]:.2f} s", flush=True)
    new, again = statistics.median(times["new kit"]), statistics.median(times["re-run"])
    return {"spec": name, "precision": precision, "depths": list(depths), "kit_mb": size_mb, "seconds": times,
            "new_kit_median_s": new, "rerun_median_s": again, "ratio": new / again}


def markdown(rows: list[dict[str, Any]], rounds: int) -> str:
    lines = [
        "## fit --ssh: a fresh timing as another run of the kit on the target (issue 10)",
        "",
        "`benchmarks/ssh_retime.py`: the kit `fit --ssh` makes (ONNX Runtime, 1 thread, two depths, one precision) "
        "over a private sshd on 127.0.0.1 (the target is this machine), one SSH connection for all kits. Wall "
        f"seconds per fresh timing, {rounds} interleaved pairs: a *new kit* (export, tar, copy, unpack, run, "
        "fetch, remove) against a *re-run* of the kit left on the target (run, fetch), which is what fit does; "
        "the run itself is the same in both. Medians; the ratio is new / re-run.",
        "",
        "| spec | precision | depths | kit MB | new kit s | re-run s | new / re-run |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['spec']} | {r['precision']} | {', '.join(map(str, r['depths']))} | {r['kit_mb']:.1f} | "
                     f"{r['new_kit_median_s']:.2f} | {r['rerun_median_s']:.2f} | {r['ratio']:.2f}x |")
    lines += ["", "Over a device's network the copy grows with the kit's size, and a TensorRT kit run again also "
              "skips building its engines (`KIT_REUSE_ENGINES=1`): neither is measured here."]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: .venv/bin/python benchmarks/ssh_retime.py --rounds 3 --specs digits")
    ap.add_argument("--specs", type=spec_names, default="digits,deit-tiny")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if sshd_missing("ssh_retime.py"):
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="tleg-sshd-") as tmp, loopback_sshd(Path(tmp)) as (target, config):
        for name in args.specs:
            rows.append(run_spec(name, target, config, args.rounds))
    print({r["spec"]: (round(r["new_kit_median_s"], 2), round(r["rerun_median_s"], 2)) for r in rows})
    write_result("ssh_retime", {"rows": rows, "args": vars(args)}, markdown(rows, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
