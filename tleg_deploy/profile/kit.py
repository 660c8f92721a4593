"""Device kits: a self-contained directory (and ``DIR.tar.gz``) that measures a target with nothing
of ours installed there. ``build_kit`` writes it; ``tleg_deploy.profile.kit_import`` reads its
results back into a ``source: measured`` profile.

A kit holds the ONNX files of the probe depths and precisions, ``kit.json`` (what it measures, the
timing protocol and the sha256 of every file) and ``run.sh`` (POSIX ``sh``), which checks its
prerequisites first, records the environment into ``results/env/`` and measures:

- ``onnxruntime``: the files ONNX Runtime times in the profiler (``runners.export_artifact``: fp32,
  dynamic int8, fp16), timed by ``kit_runner.py`` (copied into the kit; stdlib + numpy +
  onnxruntime) with the profiler's protocol. Needs ``python3`` with ``onnxruntime`` and ``numpy``
  (``KIT_PYTHON`` picks another interpreter).
- ``tensorrt``: the fp32 ONNX (fp16 builds on TensorRT 8.x/10.x, ``--fp16``), the static Q/DQ int8
  ONNX (``--int8 --fp16``) and, for TensorRT 11's strongly typed builds, the fp16 ONNX. Needs only
  ``trtexec`` (``TRTEXEC`` or the PATH, else JetPack's ``/usr/src/tensorrt/bin/trtexec``): it builds
  every engine on the device, then times them in interleaved rounds (a fresh ``trtexec --loadEngine``
  per engine per round, the order shuffled per round), keeping each run's ``--exportTimes`` JSON
  and log (``tleg_deploy.profile.trtexec`` reads them).

With ``repeats`` above 1 (``fit --kit`` makes 4) the whole measurement is made that many times, one after
another (ONNX Runtime: one results entry per depth and repeat; TensorRT: the later repeats' files carry
``_s2``, ``_s3``, ...). Results appear as ``results/`` only when the run is complete (written to
``results.partial/`` and renamed); a ``kit_id`` ties them to this kit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tleg_deploy.errors import FormatError
from tleg_deploy.files.fileio import atomic_path, sha256_file, write_json_atomic, write_text_atomic
from tleg_deploy.files.outputs import staging_dir
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile.config import MeasureConfig

KIT_FORMAT = "tleg-device-kit"
KIT_SCHEMA_VERSION = 1
KIT_BACKENDS = ("onnxruntime", "tensorrt")
TRT_WARMUP_MS = 200


@dataclass(frozen=True)
class KitConfig:
    """What a kit measures: ``measure`` carries backend, precisions, depths, batch, threads and the
    protocol (for TensorRT, ``measure.rounds`` trtexec runs per engine of ``trt_iterations`` each).
    ``repeats``: the whole measurement is made that many times, one after another, each a fresh session (the
    import pools them; ``fit --kit-results`` reads them as successive timings of each depth, so a reading near
    the budget is decided on the later ones as ``fit`` decides it on fresh timings elsewhere). ``alone`` (ONNX
    Runtime): each depth timed in its own session, one after another, instead of the depths interleaved round by
    round (the profiler's protocol, which fits a line through them): a deployment runs one model, and two models
    interleaved evict each other's weights from the caches (5-25% slower on this machine's CPU). ``fit --ssh``'s
    search uses it; a TensorRT kit runs one engine per ``trtexec`` process either way."""

    device: str
    measure: MeasureConfig
    trt_iterations: int = 200
    repeats: int = 1
    alone: bool = False

    @classmethod
    def for_backend(cls, device: str, backend: str, precisions: tuple[str, ...], depths: tuple[int, ...], *,
                    batch: int = 1, threads: int = 1, rounds: int | None = None, memory: bool = True,
                    clock: str = "wall", retries: int | None = None, repeats: int = 1,
                    alone: bool = False) -> KitConfig:
        """A kit measuring ``precisions`` x ``depths`` on ``backend`` with the profiler's protocol (TensorRT:
        on the GPU, 3 trtexec runs per engine by default; ONNX Runtime: on the CPU, 5 rounds; ``retries``:
        sessions off a line measured again, the profiler's by default)."""
        gpu = backend == "tensorrt"
        more = {} if retries is None else {"retries": retries}
        return cls(device=device, measure=MeasureConfig(
            backend=backend, precisions=precisions, depths=depths, batch=batch, threads=threads,
            device="cuda" if gpu else "cpu", rounds=(3 if gpu else 5) if rounds is None else rounds, memory=memory,
            clock=clock, **more), repeats=repeats, alone=alone)

    def __post_init__(self) -> None:
        if self.measure.backend not in KIT_BACKENDS:
            raise FormatError(f"a kit measures {' or '.join(KIT_BACKENDS)}, not {self.measure.backend!r}",
                              hint="use --backend onnxruntime or --backend tensorrt")
        if not self.device.strip() or "/" in self.device:
            raise FormatError(f"device name {self.device!r} must be a non-empty name without '/'")
        if self.trt_iterations < 10:
            raise FormatError(f"trt_iterations must be >= 10, got {self.trt_iterations}")
        if not 1 <= self.repeats <= 20:
            raise FormatError(f"repeats must be 1-20, got {self.repeats}")


def protocol(cfg: KitConfig) -> dict[str, Any]:
    m = cfg.measure
    base = {"rounds": m.rounds, "seed": m.seed, "memory": m.memory, "repeats": cfg.repeats}
    if m.backend == "tensorrt":
        return {**base, "iterations": cfg.trt_iterations, "warmup_ms": TRT_WARMUP_MS, "times": "computeMs",
                "memory_source": "trtexec log: TensorRT-managed allocation (MemUsageChange, now: GPU)"}
    return {**base, "warmup": m.warmup, "round_seconds": m.round_seconds, "min_reps": m.min_reps,
            "max_reps": m.max_reps, "extra_rounds": m.extra_rounds, "settle_rel_se": m.settle_rel_se,
            "retries": m.retries, "linear_tolerance": m.linear_tolerance, "clock": m.clock, "alone": cfg.alone}


def check_kit_destination(out_dir: str | os.PathLike[str], *, force: bool = False) -> tuple[Path, Path]:
    """The kit directory and its ``.tar.gz`` that ``build_kit`` may write (raises ``FormatError`` otherwise): new
    paths, or with ``force`` a kit and its archive; never a link, a file where the directory goes, or a
    directory we did not write. Cheap: callers check before the exports start."""
    out = Path(out_dir)
    tarball = out.with_name(out.name + ".tar.gz")
    for path in (out, tarball):
        if path.is_symlink() or (path.exists() and not (path.is_dir() if path is out else path.is_file())):
            raise FormatError(f"{path} is not a {'directory' if path is out else 'file'} tleg-deploy wrote",
                              hint="choose another -o")
    if out.exists() or tarball.exists():
        if not force:
            raise FormatError(f"{out if out.exists() else tarball} already exists", hint="pass --force to replace it")
        if out.exists() and not (out / "kit.json").is_file():
            raise FormatError(f"{out} exists and is not a device kit; not replacing it", hint="choose another -o")
        if tarball.exists() and not _is_kit_tarball(tarball, out.name):
            raise FormatError(f"{tarball} exists and is not this kit's archive; not replacing it",
                              hint="choose another -o")
    return out, tarball


def build_kit(spec: ViTSpec, cfg: KitConfig, out_dir: str | os.PathLike[str], *, learngene: Any = None,
              force: bool = False) -> Path:
    """Write the kit directory ``out_dir`` and ``out_dir.tar.gz``; returns the directory. An existing
    ``out_dir`` is replaced only with ``force`` and only if it is a kit (never a directory we did not write:
    ``check_kit_destination``)."""
    out, tarball = check_kit_destination(out_dir, force=force)
    tmp = staging_dir(out)  # the umask's mode, not mkdtemp's 0700: a kit is copied and shared
    try:
        _write(spec, cfg, tmp, learngene)
        with atomic_path(tarball) as tmp_tar:
            with tarfile.open(tmp_tar, "w:gz") as tar:
                tar.add(tmp, arcname=out.name)
            # The archive always matches the directory: a stale one goes first, the new one lands last.
            tarball.unlink(missing_ok=True)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
                out.rename(old)
                shutil.rmtree(old)
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _is_kit_tarball(path: Path, name: str) -> bool:
    try:
        with tarfile.open(path, "r:gz") as tar:
            return any(m.name == f"{name}/kit.json" for m in tar.getmembers())
    except (tarfile.TarError, OSError, EOFError):
        return False



def _write(spec: ViTSpec, cfg: KitConfig, kit: Path, learngene: Any) -> None:
    m = cfg.measure
    models = kit / "models"
    models.mkdir()
    artifacts = _export(spec, cfg, models, learngene)
    kit_id = uuid.uuid4().hex
    if m.backend == "onnxruntime":
        shutil.copyfile(Path(__file__).with_name("kit_runner.py"), kit / "kit_runner.py")
        script = ort_script(kit_id)
    else:
        script = trt_script(kit_id, spec, cfg, artifacts)
    write_text_atomic(kit / "run.sh", script)
    (kit / "run.sh").chmod(0o755)
    files = {str(p.relative_to(kit)): sha256_file(p) for p in sorted(kit.rglob("*")) if p.is_file()}
    from tleg_deploy import __version__

    write_json_atomic(kit / "kit.json", {
        "format": KIT_FORMAT, "schema_version": KIT_SCHEMA_VERSION, "kit_id": kit_id, "device": cfg.device,
        "backend": m.backend, "spec": spec.to_dict(), "depths": list(m.depths), "precisions": list(m.precisions),
        "batch": m.batch, "threads": m.threads, "protocol": protocol(cfg), "artifacts": artifacts, "files": files,
        "tool_version": f"tleg-deploy {__version__}",
    })


def _export(spec: ViTSpec, cfg: KitConfig, models: Path, learngene: Any) -> list[dict[str, Any]]:
    """Export every (precision, depth) file; returns the artifact list of kit.json (paths relative to the kit)."""
    from tleg_deploy.export import quantize
    from tleg_deploy.profile.runners import build_model, export_artifact

    m = cfg.measure
    artifacts: list[dict[str, Any]] = []
    keep: set[Path] = set()
    for depth in m.depths:
        model = build_model(spec, depth, learngene)
        for precision in m.precisions:
            if m.backend == "onnxruntime":
                path = export_artifact(model, precision, "onnxruntime", models, m.batch)
                keep.add(path)
                artifacts.append({"precision": precision, "depth": depth, "file": f"models/{path.name}"})
                continue
            fp32 = export_artifact(model, "fp32", "onnxruntime", models, m.batch)
            v10 = v11 = fp32
            if precision == "int8":
                import torch

                images = torch.randn(8, spec.in_chans, spec.img_size, spec.img_size,
                                     generator=torch.Generator().manual_seed(0))  # scales don't change speed
                v10 = v11 = quantize.quantize_int8(fp32, models / f"depth{depth}.qdq.onnx", mode="qdq",
                                                   calibration=images)
            elif precision == "fp16":
                v11 = quantize.convert_fp16(fp32, models / f"depth{depth}.fp16.onnx")
            keep.update((Path(v10), Path(v11)))
            artifacts.append({"precision": precision, "depth": depth, "file": f"models/{Path(v10).name}",
                              "file_v11": f"models/{Path(v11).name}"})
    for p in models.iterdir():
        if p not in keep:
            p.unlink()
    return artifacts


# ---------------------------------------------------------------------------------------------
# run.sh

_COMMON = r"""#!/bin/sh
# Device kit written by tleg-deploy: measures this machine with nothing of tleg-deploy installed.
# Usage: sh run.sh    (then copy results/ back and run: tleg-deploy profile --from-kit KIT_DIR)
set -eu
cd "$(dirname "$0")"
KIT_ID=__KIT_ID__
say() { echo "[kit] $*" >&2; }
fail() { echo "[kit] error: $*" >&2; exit 3; }
R=results.partial
record() {  # name command...: keep a command's output in results/env/ where the command exists
  name=$1; shift
  if command -v "$1" >/dev/null 2>&1; then "$@" >"$R/env/$name.txt" 2>&1 || true; fi
}
record_env() {
  mkdir -p "$R/env"
  record uname uname -a
  record lscpu lscpu
  record nvidia-smi nvidia-smi --format=csv \
    --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem
  record nvpmodel nvpmodel -q
  record jetson_clocks jetson_clocks --show
  cpufreq=/sys/devices/system/cpu/cpu0/cpufreq
  for f in /etc/nv_tegra_release /proc/device-tree/model $cpufreq/scaling_governor $cpufreq/scaling_cur_freq \
           $cpufreq/scaling_max_freq; do
    if [ -r "$f" ]; then printf '%s: %s\n' "$f" "$(tr -d '\000' <"$f")" >>"$R/env/board.txt"; fi
  done
}
child=""
run() {  # command...: in the background and waited for, so Ctrl-C (or the remote kill) reaches the trap at once
  "$@" &
  child=$!
  rc=0; wait "$child" || rc=$?
  child=""
  return "$rc"
}
trap 'if [ -n "$child" ]; then kill "$child" 2>/dev/null || true; fi; rm -rf "$R"; say "stopped"; exit 130' INT TERM HUP
finish() {
  echo "$KIT_ID" >"$R/kit_id"
  rm -rf results
  mv "$R" results
  say "done: results/ is complete; import it with: tleg-deploy profile --from-kit $(pwd)"
}
"""

_ORT = r"""
PY="${KIT_PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 \
  || fail "missing: $PY (Python 3.8 or newer; set KIT_PYTHON=/path/to/python3 to use another)"
# One interpreter start checks both packages and reads the versions (each start imports onnxruntime: ~0.3 s).
info=$("$PY" -c '
import sys
missing = []
for name in ("numpy", "onnxruntime"):
    try:
        __import__(name)
    except Exception:
        missing.append(name)
if missing:
    print("missing: " + " ".join(missing))
else:
    import onnxruntime
    print("onnxruntime", onnxruntime.__version__)
    print("python", sys.version)
' 2>/dev/null) || info="missing: numpy onnxruntime"
case "$info" in
  missing:*) pkgs=${info#missing:}
    fail "missing Python packages for $PY:$pkgs (install them with: $PY -m pip install$pkgs)" ;;
esac
rm -rf "$R"
record_env
printf '%s\n' "$info" >"$R/env/runtime.txt"
run "$PY" kit_runner.py . "$R" || fail "the runner failed (see the messages above)"
finish
"""


def ort_script(kit_id: str) -> str:
    return _COMMON.replace("__KIT_ID__", kit_id) + _ORT


_TRT_HEAD = r"""
TRTEXEC="${TRTEXEC:-}"
if [ -z "$TRTEXEC" ]; then
  if command -v trtexec >/dev/null 2>&1; then TRTEXEC=trtexec
  elif [ -x /usr/src/tensorrt/bin/trtexec ]; then TRTEXEC=/usr/src/tensorrt/bin/trtexec
  else fail "missing: trtexec (not on PATH nor at /usr/src/tensorrt/bin/trtexec; JetPack ships it with \
TensorRT; set TRTEXEC=/path/to/trtexec)"
  fi
fi
MAJOR=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*\[TensorRT v\([0-9]*\)\].*/\1/p' | head -n 1)
[ -n "$MAJOR" ] || fail "could not read the TensorRT version from '$TRTEXEC --help'"
if [ "$MAJOR" -ge 100000 ]; then MAJOR=$((MAJOR / 10000)); else MAJOR=$((MAJOR / 1000)); fi
rm -rf "$R"
mkdir -p "$R/trt" engines
record_env
"$TRTEXEC" --help >"$R/env/trtexec_help.txt" 2>&1 || true
say "TensorRT major version $MAJOR"
build() {  # precision depth onnx flags...
  p=$1; d=$2; onnx=$3; shift 3
  # KIT_REUSE_ENGINES=1 (set by tleg-deploy when it runs this kit again on the same device over SSH): load the
  # engine an earlier run of this kit built here instead of building it again. An engine is kept only once
  # complete (built under another name, then renamed).
  if [ "${KIT_REUSE_ENGINES:-0}" = 1 ] && [ -s "engines/${p}_d$d.engine" ]; then
    say "reusing the $p depth $d engine this kit built earlier"
    return 0
  fi
  say "building $p depth $d from $onnx"
  run "$TRTEXEC" --onnx="$onnx" --saveEngine="engines/${p}_d$d.engine.partial" \
    --timingCacheFile=engines/timing.cache \
    --minShapes=pixel_values:$SHAPE --optShapes=pixel_values:$SHAPE --maxShapes=pixel_values:$SHAPE \
    --skipInference "$@" >"$R/trt/build_${p}_d$d.log" 2>&1 \
    || fail "trtexec could not build $p depth $d (see $R/trt/build_${p}_d$d.log)"
  mv "engines/${p}_d$d.engine.partial" "engines/${p}_d$d.engine"
}
timed() {  # precision depth round [repeat: 2, 3, ... (the first repeat's files carry no _s)]
  n="${1}_d$2"
  f="$n${4:+_s$4}_r$3"
  say "timing $1 depth $2 (round $3 of $ROUNDS${4:+, repeat $4 of $REPEATS})"
  run "$TRTEXEC" --loadEngine="engines/$n.engine" --shapes=pixel_values:$SHAPE --warmUp=$WARMUP_MS --duration=0 \
    --iterations=$ITERATIONS --useSpinWait --exportTimes="$R/trt/$f.times.json" >"$R/trt/$f.log" 2>&1 \
    || fail "trtexec could not time $n (see $R/trt/$f.log)"
}
"""


def trt_script(kit_id: str, spec: ViTSpec, cfg: KitConfig, artifacts: list[dict[str, Any]]) -> str:
    from tleg_deploy.plan.precisions import PRECISION

    m = cfg.measure
    lines = [_COMMON.replace("__KIT_ID__", kit_id),
             f"SHAPE={m.batch}x{spec.in_chans}x{spec.img_size}x{spec.img_size}",
             f"ROUNDS={m.rounds}", f"REPEATS={cfg.repeats}", f"ITERATIONS={cfg.trt_iterations}",
             f"WARMUP_MS={TRT_WARMUP_MS}", _TRT_HEAD]
    for a in artifacts:
        p = PRECISION[a["precision"]]
        lines.append(f'if [ "$MAJOR" -ge 11 ]; then build {p.name} {a["depth"]} {a["file_v11"]}{p.trtexec_flags(11)}; '
                     f'else build {p.name} {a["depth"]} {a["file"]}{p.trtexec_flags(10)}; fi')
    rng = random.Random(m.seed)
    order = [(a["precision"], a["depth"]) for a in artifacts]
    for repeat in range(1, cfg.repeats + 1):
        for r in range(1, m.rounds + 1):
            rng.shuffle(order)
            lines += [f"timed {p} {d} {r}" + (f" {repeat}" if repeat > 1 else "") for p, d in order]
    lines.append("finish")
    return "\n".join(lines) + "\n"


def read_kit_json(kit_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``kit.json`` of a kit directory, format and schema checked."""
    path = Path(kit_dir) / "kit.json"
    if not path.is_file():
        raise FormatError(f"{kit_dir} is not a device kit (no kit.json)", hint="make one with: tleg-deploy kit")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != KIT_FORMAT:
        raise FormatError(f"{path} is not a tleg-deploy device kit (format {data.get('format')!r})"
                          if isinstance(data, dict) else f"{path} is not a JSON object")
    if data.get("schema_version") != KIT_SCHEMA_VERSION:
        raise FormatError(f"{path} has schema_version {data.get('schema_version')!r}; this tleg-deploy reads "
                          f"{KIT_SCHEMA_VERSION}", hint="make the kit again with this version")
    return data


def is_kit(path: Path) -> bool:
    with contextlib.suppress(FormatError, OSError):
        read_kit_json(path)
        return True
    return False
