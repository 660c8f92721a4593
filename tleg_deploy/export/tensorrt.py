"""TensorRT engines: ``build_tensorrt_engine`` (the real ``tensorrt`` Python API) and
``write_build_script`` (the ``trtexec`` / Polygraphy commands that build and check the same
engines on the target device, where this package may not be installed).

TensorRT 10 and 11 differ in how precision is chosen (NVIDIA, "Migrating from TensorRT 10.x to
11.x"): 10.x builds *weakly typed* networks by default and enables reduced-precision kernels with
builder flags (``BuilderFlag.FP16``, ``BuilderFlag.INT8``; trtexec ``--fp16``, ``--int8``); 11.x
removed those flags and every network is *strongly typed* — the precision comes from the ONNX
itself (our fp16 file, or the static Q/DQ int8 file), and ``--stronglyTyped`` is a no-op. So for
11.x we build the precision-specific ONNX file, for 10.x the fp32 file plus flags (int8 from the
Q/DQ file, which is explicit quantization in both). TensorRT cannot read ONNX Runtime's dynamic
quantization, hence the separate Q/DQ variant.

Engines have one optimization profile for the batch range ``min..max`` (optimised at ``opt``), and
a timing cache file that a whole depth family shares: the blocks of every member have the same
shapes, so after the first member most tactics come from the cache.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from tleg_deploy.errors import BackendError, ExportError
from tleg_deploy.export.onnx import INPUT_NAME
from tleg_deploy.files.fileio import atomic_path, write_text_atomic
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan.precisions import PRECISION, PRECISIONS

TRT_PRECISIONS = PRECISIONS
INSTALL_HINT = "pip install 'tleg-deploy[tensorrt]' (tensorrt>=10) on a machine with an NVIDIA GPU and driver"


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 1
    max: int = 32

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ExportError(f"batch range {self.min}/{self.opt}/{self.max} must satisfy 1 <= min <= opt <= max")

    def shape(self, spec: ViTSpec, batch: int) -> tuple[int, int, int, int]:
        return (batch, spec.in_chans, spec.img_size, spec.img_size)


def tensorrt_major() -> int:
    """The installed TensorRT's major version; ``BackendError`` with an install hint if absent."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendError("the tensorrt package is not installed", hint=INSTALL_HINT) from e
    return int(str(trt.__version__).split(".")[0])


def build_tensorrt_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    spec: ViTSpec,
    precision: str = "fp32",
    batch: BatchRange | None = None,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_mb: int | None = None,
) -> Path:
    """Build and serialize an engine for ``onnx_path``.

    On TensorRT 11 ``onnx_path`` must already carry the precision (fp16 file, or the Q/DQ file for
    int8); on TensorRT 10 pass the fp32 file for fp32/fp16 (builder flags) and the Q/DQ file for
    int8. ``timing_cache`` is read if it exists and written back, so a family shares it.
    """
    if precision not in TRT_PRECISIONS:
        raise ExportError(f"unknown TensorRT precision {precision!r}",
                          hint=f"choose one of {', '.join(TRT_PRECISIONS)}")
    major = tensorrt_major()
    import tensorrt as trt

    batch = batch or BatchRange()
    onnx_file = Path(onnx_path)
    _check_onnx_precision(onnx_file, precision, major)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major >= 11:  # strongly typed (the only kind in 11.x): precision and Q/DQ scales from the graph
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_file.name}: {errors[:500]}")
    config = builder.create_builder_config()
    if major < 11:  # weakly typed 10.x: reduced precision by flags (int8: Q/DQ needs INT8, the rest runs fp16)
        for flag in PRECISION[precision].tensorrt_flags_v10:
            config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    lo, opt, hi = (batch.shape(spec, b) for b in (batch.min, batch.opt, batch.max))
    profile.set_shape(INPUT_NAME, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_file = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_file.read_bytes() if cache_file and cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_file.name} ({precision})")
    target = Path(engine_path)
    with atomic_path(target) as tmp:
        tmp.write_bytes(bytes(memoryview(serialized)))  # IHostMemory exposes the buffer protocol
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return target


def _check_onnx_precision(onnx_file: Path, precision: str, major: int) -> None:
    from tleg_deploy.export.onnx import read_metadata

    if not onnx_file.is_file():
        raise FileNotFoundError(f"no such file: {onnx_file}")
    found = read_metadata(onnx_file).get("precision", "fp32")
    if found == "int8":
        raise ExportError(f"{onnx_file.name} uses ONNX Runtime dynamic quantization, which TensorRT cannot read",
                          hint="use the static Q/DQ file (quantize_int8(..., mode='qdq'))")
    want = PRECISION[precision].tensorrt_kind(major)
    if found != want:
        raise ExportError(f"a TensorRT {major} {precision} engine needs the {want} ONNX file; "
                          f"{onnx_file.name} is {found}")


def trtexec_commands(
    files: dict[str, str], spec: ViTSpec, *, batch: BatchRange | None = None, timing_cache: str = "timing.cache",
) -> dict[str, dict[int, str]]:
    """``{precision: {trt_major: command}}`` for the ONNX ``files`` given per precision
    (keys ``fp32``, optionally ``fp16`` and ``int8-qdq``), relative to the script's directory."""
    batch = batch or BatchRange()
    dims = lambda b: "x".join(str(d) for d in batch.shape(spec, b))  # noqa: E731
    shapes = (f"--minShapes={INPUT_NAME}:{dims(batch.min)} --optShapes={INPUT_NAME}:{dims(batch.opt)} "
              f"--maxShapes={INPUT_NAME}:{dims(batch.max)}")
    common = f"{shapes} --timingCacheFile={shlex.quote(timing_cache)}"
    out: dict[str, dict[int, str]] = {}

    def cmd(onnx: str, engine: str, extra: str = "") -> str:
        return f"trtexec --onnx={onnx} --saveEngine={shlex.quote(engine)} {common}{extra}"

    stem = Path(files["fp32"]).stem
    # Q/DQ int8 is explicit quantization: 10.x (weakly typed) needs --int8 (+ --fp16 for the unquantized
    # layers); 11.x reads the scales and types from the graph and has no precision flags.
    for p in PRECISION.values():
        engine = f"{stem}_{p.name}.engine"
        by_major = {major: cmd(shlex.quote(files[p.tensorrt_kind(major)]), engine, p.trtexec_flags(major))
                    for major in (10, 11) if p.tensorrt_kind(major) in files}
        if 10 in by_major:
            out[p.name] = by_major
    return out


def polygraphy_command(onnx: str, spec: ViTSpec, *, batch: BatchRange | None = None, precision: str = "fp32") -> str:
    """Compare TensorRT with ONNX Runtime on the same random inputs (tolerances per precision)."""
    batch = batch or BatchRange()
    shape = lambda b: "[" + ",".join(str(d) for d in batch.shape(spec, b)) + "]"  # noqa: E731
    tol = PRECISION[precision].polygraphy_tolerance
    extra = " --fp16" if precision == "fp16" and not onnx.endswith("_fp16.onnx") else ""
    return (f"polygraphy run {shlex.quote(onnx)} --trt --onnxrt{extra} "
            f"--trt-min-shapes {INPUT_NAME}:{shape(batch.min)} --trt-opt-shapes {INPUT_NAME}:{shape(batch.opt)} "
            f"--trt-max-shapes {INPUT_NAME}:{shape(batch.max)} --input-shapes {INPUT_NAME}:{shape(batch.opt)} "
            f"--atol {tol} --rtol {tol}")


def build_script(
    files: dict[str, str], spec: ViTSpec, *, batch: BatchRange | None = None, timing_cache: str = "timing.cache"
) -> str:
    """The text of ``build_engine.sh``: picks the TensorRT major version, builds every engine with
    ``trtexec``, then compares each with ONNX Runtime using Polygraphy."""
    cmds = trtexec_commands(files, spec, batch=batch, timing_cache=timing_cache)
    lines = [
        "#!/usr/bin/env bash",
        "# Build TensorRT engines for these ONNX files on the target device (written by tleg-deploy).",
        "# TensorRT 10.x: weakly typed builds, precision from --fp16 / --int8 (int8 scales from the Q/DQ file).",
        "# TensorRT 11.x: strongly typed only (--fp16/--int8 were removed); precision comes from the ONNX file.",
        "# The timing cache is shared by every engine in this directory (and a family's members).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRT_MAJOR="${TRT_MAJOR:-$(python3 -c \'import tensorrt; print(tensorrt.__version__.split(".")[0])\' '
        "2>/dev/null || trtexec --help 2>&1 | sed -n 's/.*TensorRT v\\([0-9]*\\)[0-9][0-9][0-9][0-9].*/\\1/p' "
        '| head -n1)}"',
        'TRT_MAJOR="${TRT_MAJOR:-10}"',
        'echo "building with TensorRT major version ${TRT_MAJOR}"',
        'if [ "${TRT_MAJOR}" -ge 11 ]; then',
    ]
    lines += [f"  {c[11]}" for c in cmds.values() if 11 in c]
    lines.append("else")
    lines += [f"  {c[10]}" for c in cmds.values()]
    lines.append("fi")
    lines.append("# Compare TensorRT with ONNX Runtime on random inputs:")
    lines.append(polygraphy_command(files["fp32"], spec, batch=batch))
    if "fp16" in files:
        lines.append(polygraphy_command(files["fp16"], spec, batch=batch, precision="fp16"))
    return "\n".join(lines) + "\n"


def write_build_script(
    directory: str | os.PathLike[str], files: dict[str, str], spec: ViTSpec, *,
    batch: BatchRange | None = None, timing_cache: str = "timing.cache",
) -> Path:
    """Write ``build_engine.sh`` (executable) into ``directory``."""
    path = Path(directory) / "build_engine.sh"
    write_text_atomic(path, build_script(files, spec, batch=batch, timing_cache=timing_cache))
    path.chmod(0o755)
    return path
