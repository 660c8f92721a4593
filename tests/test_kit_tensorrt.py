"""TensorRT device kits, end to end against a stand-in ``trtexec`` (this machine has no TensorRT): run.sh
builds every engine from the right ONNX file with the right flags per major version, times them in
interleaved rounds with --exportTimes, and the import reads times and device memory from what trtexec writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tleg_deploy.errors import FormatError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile.config import MeasureConfig
from tleg_deploy.profile.kit import KitConfig, build_kit
from tleg_deploy.profile.kit_import import import_kit

SPEC = ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=4)

# Writes what trtexec writes, in the formats of tests/data/trtexec: GPU time 0.5 + 0.25·depth ms (int8: x0.6),
# TensorRT-managed device memory 10 + 2·depth MiB. Every call is appended to calls.txt.
FAKE = r'''
import json, os, random, re, sys
args = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in sys.argv[1:])
tag = os.environ["FAKE_TRT_TAG"]
with open(os.environ["FAKE_TRT_CALLS"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
print(f"&&&& RUNNING TensorRT.trtexec [TensorRT {tag}] # trtexec " + " ".join(sys.argv[1:]))
if "help" in args:
    sys.exit(0)
if "onnx" in args:
    assert os.path.isfile(args["onnx"]) and "skipInference" in args
    depth = int(re.search(r"depth(\d+)", args["onnx"]).group(1))
    with open(args["saveEngine"], "w") as f:
        json.dump({"depth": depth, "int8": "int8" in args or "qdq" in args["onnx"]}, f)
    sys.exit(0)
engine = json.load(open(args["loadEngine"]))
d = engine["depth"]
base = (0.5 + 0.25 * d) * (0.6 if engine["int8"] else 1.0)
rng = random.Random(d)
times = [base * (1 + rng.uniform(-0.01, 0.01)) for _ in range(int(args["iterations"]))]
rows = [{"count": len(times)}] + [{"startComputeMs": i, "endComputeMs": i + t, "computeMs": t, "latencyMs": t + 0.2}
                                  for i, t in enumerate(times)]
with open(args["exportTimes"], "w") as f:
    f.write("[\n  " + "\n, ".join(json.dumps(r) for r in rows) + "\n]\n")
mem = 10 + 2 * d
print(f"[I] [TRT] [MemUsageChange] TensorRT-managed allocation in IExecutionContext creation: CPU +0, GPU +2, "
      f"now: CPU 0, GPU {mem} (MiB)")
s = sorted(times)
print(f"[I] GPU Compute Time: min = {s[0]} ms, max = {s[-1]} ms, mean = {sum(s) / len(s)} ms, "
      f"median = {s[len(s) // 2]} ms, percentile(90%) = {s[int(0.9 * len(s))]} ms")
'''


@pytest.fixture(scope="module")
def trt_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = KitConfig("orin", MeasureConfig(backend="tensorrt", device="cuda", precisions=("fp16", "int8"),
                                          depths=(1, 2, 4), rounds=2), trt_iterations=20)
    return build_kit(SPEC, cfg, tmp_path_factory.mktemp("trt") / "kit-orin")


def _run(kit: Path, tmp_path: Path, tag: str, **extra: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    fake = tmp_path / "trtexec"
    fake.write_text(f"#!{sys.executable}\n{FAKE}")
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {**os.environ, "TRTEXEC": str(fake), "FAKE_TRT_TAG": tag, "FAKE_TRT_CALLS": str(calls), **extra}
    proc = subprocess.run(["sh", str(kit / "run.sh")], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    return proc, calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize(("tag", "major"), [("v8601", 8), ("v100300", 10), ("v110000", 11)])
def test_tensorrt_kit_builds_times_and_imports(trt_kit: Path, tmp_path: Path, tag: str, major: int) -> None:
    kit = tmp_path / "kit-orin"
    shutil.copytree(trt_kit, kit)
    proc, calls = _run(kit, tmp_path, tag)
    assert proc.returncode == 0, proc.stderr
    builds = [c for c in calls if "--onnx=" in c]
    fp16 = next(c for c in builds if "fp16_d2.engine" in c)
    int8 = next(c for c in builds if "int8_d2.engine" in c)
    if major >= 11:  # strongly typed: the precision comes from the file, no flags
        assert "--onnx=models/depth2.fp16.onnx" in fp16 and "--fp16" not in fp16 and "--int8" not in int8
    else:
        assert "--onnx=models/depth2.onnx" in fp16 and "--fp16" in fp16 and "--int8 --fp16" in int8
    assert "--onnx=models/depth2.qdq.onnx" in int8
    timed = [c.split("--loadEngine=engines/")[1].split(".engine")[0] for c in calls if "--loadEngine" in c]
    # 2 rounds, each timing all 6 engines once (the order is shuffled per round: two equal orders happen
    # 1 time in 720, so the test does not demand they differ)
    assert len(timed) == 2 * 6 and len(set(timed[:6])) == 6 and sorted(timed[:6]) == sorted(timed[6:])
    prof = import_kit(kit)
    assert (prof.backend, prof.kind, prof.source) == ("tensorrt", "gpu", "measured")
    for e in prof.entries:
        scale = 0.6 if e.precision == "int8" else 1.0
        for p in e.points:
            assert p.p50_ms == pytest.approx((0.5 + 0.25 * p.depth) * scale, rel=0.02)
            assert p.memory_mb == pytest.approx((10 + 2 * p.depth) * 1.048576)
            assert p.n == 40 and p.rounds == 2


def test_tensorrt_kit_without_trtexec_says_so(trt_kit: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    env["PATH"] = "/usr/bin:/bin"
    if shutil.which("trtexec", path=env["PATH"]) or Path("/usr/src/tensorrt/bin/trtexec").exists():
        pytest.skip("this machine has trtexec")
    proc = subprocess.run(["sh", str(trt_kit / "run.sh")], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 3 and "missing: trtexec" in proc.stderr
    assert not (trt_kit / "results").exists() and not (trt_kit / "results.partial").exists()


def test_a_cut_short_tensorrt_run_is_refused(trt_kit: Path, tmp_path: Path) -> None:
    kit = tmp_path / "kit-orin"
    shutil.copytree(trt_kit, kit)
    proc, _ = _run(kit, tmp_path, "v100300")
    assert proc.returncode == 0, proc.stderr
    victim = next((kit / "results" / "trt").glob("int8_d4_r2.times.json"))
    victim.write_text(victim.read_text()[:200])
    with pytest.raises(FormatError, match="int8_d4_r2.times.json is not complete JSON"):
        import_kit(kit)


def test_a_tensorrt_kit_run_again_on_its_device_reuses_its_engines(trt_kit: Path, tmp_path: Path) -> None:
    """``fit --ssh`` times a depth afresh by running its kit again where it ran (``KIT_REUSE_ENGINES=1``): the
    engines the first run built are loaded, not built again, and the results are complete. An engine is kept only
    once built whole (under another name until then). Run by hand without the variable, the kit builds again."""
    kit = tmp_path / "kit-orin"
    shutil.copytree(trt_kit, kit)
    proc, first = _run(kit, tmp_path, "v100300")
    assert proc.returncode == 0, proc.stderr
    assert sum("--onnx=" in c for c in first) == 6 and not list((kit / "engines").glob("*.partial"))
    assert sorted(p.name for p in (kit / "engines").glob("*.engine")) == sorted(
        f"{p}_d{d}.engine" for p in ("fp16", "int8") for d in (1, 2, 4))
    proc, again = _run(kit, tmp_path, "v100300", KIT_REUSE_ENGINES="1")
    assert proc.returncode == 0, proc.stderr
    assert not any("--onnx=" in c for c in again) and sum("--loadEngine" in c for c in again) == 2 * 6
    assert proc.stderr.count("reusing the") == 6
    assert import_kit(kit).entries  # the second run's results are complete
    proc, by_hand = _run(kit, tmp_path, "v100300")
    assert proc.returncode == 0 and sum("--onnx=" in c for c in by_hand) == 6


def test_a_tensorrt_kit_with_repeats_times_each_engine_again(tmp_path: Path) -> None:
    """``repeats=2``: every round of every engine is timed again after the first repeat (files ``_s2``); the
    engines are built once; the import pools both repeats, ``kit_readings`` gives them one by one."""
    from tleg_deploy.profile.kit_import import kit_readings

    cfg = KitConfig("orin", MeasureConfig(backend="tensorrt", device="cuda", precisions=("fp16",), depths=(1, 2),
                                          rounds=2), trt_iterations=20, repeats=2)
    kit = build_kit(SPEC, cfg, tmp_path / "kit-orin")
    proc, calls = _run(kit, tmp_path, "v100300")
    assert proc.returncode == 0, proc.stderr
    assert sum("--onnx=" in c for c in calls) == 2 and sum("--loadEngine" in c for c in calls) == 2 * 2 * 2
    assert (kit / "results" / "trt" / "fp16_d2_s2_r2.times.json").is_file() and "repeat 2 of 2" in proc.stderr
    _kit, readings = kit_readings(kit)
    assert [len(readings[("fp16", d)]) for d in (1, 2)] == [2, 2]
    assert all(p.n == 40 for d in (1, 2) for p in readings[("fp16", d)])
    assert [p.n for p in import_kit(kit).entries[0].points] == [80, 80]
