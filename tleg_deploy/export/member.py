"""One member of a depth family (``export.family``): build every requested file of one depth into a hidden
staging directory and validate it (``build_member``, ``stage_member``), and do that for several members at
once in worker processes (``staged_in_parallel``) while the family commits them one at a time as each is ready.

Members run in parallel only when the depth template builds their graphs (``torch.onnx.export`` keeps global
state), never when TensorRT engines are built (they share a timing cache) or latencies are measured
(``workers_for``). Everything a member writes stays in its own staging directory; what the members share
(``MemberContext``: the template, the images) is loaded before the workers start and only read by them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tleg_deploy.errors import ExportError, TlegError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan import costs
from tleg_deploy.plan.precisions import ONNX_KINDS, PRECISION, PRECISIONS


@dataclass
class Staged:
    """A member built and validated in its staging directory, ready to commit."""

    depth: int
    stage: Path
    artifacts: list[dict[str, Any]]
    sha256: dict[str, str]  # file name in ``stage`` -> sha256, hashed by the member's own worker


@dataclass
class MemberContext:
    out_dir: Path
    formats: tuple[str, ...]
    learngene_sha256: str
    data: str | None
    batch: Any
    profile: Any
    measure_latency: bool
    template: Any
    exporter: str = "auto"  # export_onnx's exporter, for the probe or for every member without a template
    card: Any = None  # files.datacard.DataCard: class names and preprocessing, in every ONNX file's metadata
    skip: frozenset[str] = frozenset()  # precisions whose variants are not written (fit: failed validation)
    # The template-built member (depth >= 2) that gets the full validation and proves the template for the
    # others (``validate_member``). It is committed before any of them and they are kept only if it passes.
    prover: int | None = None
    _images: Any = None
    _calibration: Any = None

    @property
    def proven_by(self) -> str | None:
        return None if self.prover is None else f"{member_dir(self.prover)}/model.onnx"

    def images(self, spec: ViTSpec) -> Any:
        if self._images is None:
            self._images = _load_images(self.data, spec, "test")
        return self._images

    def calibration(self, spec: ViTSpec) -> Any:
        if self._calibration is None:
            self._calibration = _load_images(self.data, spec, "train")[:256]
        return self._calibration


def _load_images(data: str | None, spec: ViTSpec, split: str) -> Any:
    if data is None:
        raise ExportError("int8 and fp16 variants are validated on real images, but no data was given",
                          hint="pass data='digits' (or folder:PATH / npz:PATH)")
    from tleg_deploy.train.data import load_data

    return load_data(data, spec, split)[0]


def workers_for(workers: int | None, fmts: tuple[str, ...], measure_latency: bool) -> int:
    if "tensorrt" in fmts or measure_latency:
        return 1  # engines share a timing cache; latencies are timed alone
    if workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    if workers < 1:
        raise ExportError(f"workers must be >= 1, got {workers}")
    return workers


def prefetch(ctx: MemberContext, spec: ViTSpec) -> None:
    if ctx.data is None:
        return  # a variant that needs images fails in its member, naming the missing data
    if ({"int8", "fp16", "tensorrt"} & set(ctx.formats)) - ctx.skip:
        ctx.images(spec)
    if "tensorrt" in ctx.formats:
        ctx.calibration(spec)


def staged_in_parallel(ctx: MemberContext, depths: list[int], member: Callable[[int], Any],
                        n_workers: int) -> Iterator[Staged]:
    """Build and validate ``depths`` (``stage_member``) in ``n_workers`` worker processes (threads where the
    platform cannot fork: ``_workers``) and yield each to be committed.

    ``ctx.prover`` (if among ``depths``) starts first and is yielded first: the others' validation cites it,
    so none of them is yielded unless it passed. The rest start deepest (longest) first, so that no long
    member starts last while the other workers idle, and are yielded as each is ready, so the caller commits
    it while the others still build (in depth order every commit would wait for the shallowest member,
    which starts last). On an error or Ctrl-C the members not started are cancelled, the running ones are
    stopped (worker processes) or finish (threads), and every staging directory not yet committed is
    removed."""
    from concurrent.futures import as_completed

    first = [ctx.prover] if ctx.prover in depths else []
    order = first + sorted(set(depths) - set(first), reverse=True)
    committed: set[int] = set()
    try:
        with _workers(ctx, member, n_workers) as submit:
            futures = [submit(d) for d in order]
            if first:
                yield futures[0].result()
                committed.add(order[0])
            for future in as_completed(futures[len(first):]):
                staged = future.result()
                yield staged
                committed.add(staged.depth)
    finally:
        for d in set(depths) - committed:  # the workers are gone: nothing writes there any more
            shutil.rmtree(staging_path(ctx.out_dir, d), ignore_errors=True)


# Members handed to forked worker processes, by job: the children inherit this at fork, so the context and
# the models (closures, fine-tuned weights, hooks) are never pickled; only depths go in and ``Staged`` comes out.
_JOBS: dict[int, tuple[MemberContext, Callable[[int], Any]]] = {}


def _stage_in_child(job: int, depth: int) -> Staged:
    ctx, member = _JOBS[job]
    return stage_member(ctx, member(depth))


def _child_started(parent: int) -> None:
    """In each worker process: one torch thread (the members share the cores; torch's OpenMP pool does not
    survive a fork), Ctrl-C left to the parent (it stops the workers), and death with the parent (an
    orphan would hold the directory's lock)."""
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)


@contextlib.contextmanager
def _workers(ctx: MemberContext, member: Callable[[int], Any], n_workers: int) -> Iterator[Callable[[int], Any]]:
    """``submit(depth) -> Future[Staged]`` on ``n_workers`` workers; on leaving, every worker is gone.

    Worker processes (forked, so they start at once with everything the parent has loaded) where the platform
    has fork, else threads: building a member holds the GIL for much of its time (protobuf serialization,
    module construction, the per-operation dispatch of a batch-1 forward), so threads share two cores poorly
    (deit-tiny 1-12 on 2 cores: 0.87 s with 2 threads, 0.75 s with 2 processes)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if "fork" not in mp.get_all_start_methods():
        threads = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="tleg-export")
        try:
            yield lambda d: threads.submit(lambda: stage_member(ctx, member(d)))
        finally:
            threads.shutdown(wait=True, cancel_futures=True)
        return
    job = id(ctx)
    _JOBS[job] = (ctx, member)
    try:
        pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("fork"),
                                   initializer=_child_started, initargs=(os.getpid(),))
        ok = False
        try:
            yield lambda d: pool.submit(_stage_in_child, job, d)
            ok = True
        finally:
            if not ok:  # an error or Ctrl-C: stop the members still building instead of waiting for them
                _terminate(pool)
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        _JOBS.pop(job, None)


def _terminate(pool: Any) -> None:
    """Stop a ``ProcessPoolExecutor``'s workers now (``terminate_workers`` from Python 3.14; before it, its
    process table)."""
    if hasattr(pool, "terminate_workers"):
        pool.terminate_workers()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.terminate()


def member_dir(depth: int) -> str:
    return f"depth_{depth:02d}"


def staging_path(out_dir: Path, depth: int) -> Path:
    """Where a member is built before the family moves it into ``member_dir(depth)``."""
    return out_dir / f".{member_dir(depth)}.partial"


MEMBER_FILE = re.compile(r"model(_\w+)?\.(onnx|engine)|model(_\w+)?\.validation\.json|build_engine\.sh")


def is_member_file(name: str) -> bool:
    """A file name ``build_member`` writes into a ``depth_NN/`` (so a re-run may replace it)."""
    return MEMBER_FILE.fullmatch(name) is not None


def stage_member(ctx: MemberContext, model: Any) -> Staged:
    """Build and validate one member into its hidden staging directory and hash its files (thread-safe:
    nothing shared is written)."""
    from tleg_deploy.files.fileio import sha256_file

    depth = model.depth
    stage = staging_path(ctx.out_dir, depth)
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        artifacts = build_member(ctx, model, stage)
        return Staged(depth, stage, artifacts, {p.name: sha256_file(p) for p in sorted(stage.iterdir())})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def build_member(ctx: MemberContext, model: Any, stage: Path) -> list[dict[str, Any]]:
    """Write and validate every requested file of one member into ``stage``; artifact entries."""
    from tleg_deploy.export.onnx import export_proto, model_metadata, save_proto, set_metadata
    from tleg_deploy.export.quantize import convert_fp16, quantize_int8
    from tleg_deploy.export.validate import validate_member, validate_onnx

    spec, depth = model.spec, model.depth
    meta = {"learngene_sha256": ctx.learngene_sha256, "precision": "fp32"}
    if ctx.card is not None:
        meta["data"] = ctx.card.to_json()
    if ctx.template is not None:
        proto = ctx.template.proto(model, meta)
    else:
        proto = export_proto(model, exporter=ctx.exporter)
        set_metadata(proto, model_metadata(model) | meta)
    fp32 = save_proto(proto, stage / "model.onnx")
    if ctx.template is not None and ctx.proven_by is not None and depth != ctx.prover:
        reports = {"fp32": validate_member(fp32, model, ctx.template, proven_by=ctx.proven_by)}
    else:
        reports = {"fp32": validate_onnx(fp32, model, precision="fp32")}
    files = {"fp32": fp32}
    if "int8" in ctx.formats and "int8" not in ctx.skip:
        files["int8"] = quantize_int8(fp32, stage / "model_int8.onnx")
        reports["int8"] = validate_onnx(files["int8"], model, precision="int8", images=ctx.images(spec), data=ctx.data)
    if ("fp16" in ctx.formats or "tensorrt" in ctx.formats) and "fp16" not in ctx.skip:
        files["fp16"] = convert_fp16(fp32, stage / "model_fp16.onnx")
        images = ctx.images(spec) if ctx.data else None
        reports["fp16"] = validate_onnx(files["fp16"], model, precision="fp16", images=images, data=ctx.data)
    if "tensorrt" in ctx.formats:
        if "int8" not in ctx.skip:
            files["int8-qdq"] = quantize_int8(fp32, stage / "model_int8_qdq.onnx", mode="qdq",
                                              calibration=ctx.calibration(spec))
            reports["int8-qdq"] = validate_onnx(files["int8-qdq"], model, precision="int8-qdq",
                                                images=ctx.images(spec), data=ctx.data)
        _tensorrt(ctx, spec, stage, files)
    def entry(precision: str, fmt: str, path: Path, parity: dict[str, Any] | None) -> dict[str, Any]:
        return {"depth": depth, "precision": precision, "format": fmt, "file": path.name,
                "bytes": path.stat().st_size, "sha256": "", "params": costs.params(spec, depth),
                "macs": costs.macs(spec, depth), "parity": parity,
                "latency": _latency(ctx, spec, depth, precision, path if fmt == "onnx" else None)}

    artifacts = []
    for precision, path in files.items():
        r = reports[precision]
        artifacts.append(entry(precision, "onnx", path, {
            "max_abs_diff": r.max_abs_diff["logits"],
            "max_rel_diff": None if r.max_rel_diff is None else r.max_rel_diff["logits"],
            "tolerance": r.to_dict()["tolerance"]["logits"],
            "agreement": r.agreement, "images": r.images, "data": r.data,
            "report": path.stem + ".validation.json", "mode": r.mode,
        }))
    for precision in PRECISIONS:
        engine = stage / f"model_{precision}.engine"
        if engine.exists():
            artifacts.append(entry(precision, "tensorrt", engine, None))
    return artifacts


def _tensorrt(ctx: MemberContext, spec: ViTSpec, stage: Path, files: dict[str, Path]) -> None:
    from tleg_deploy.export.tensorrt import build_tensorrt_engine, tensorrt_major, write_build_script

    readable = {p.tensorrt_kind(major) for p in PRECISION.values() for major in (10, 11)}  # not dynamic int8
    names = {k: p.name for k, p in files.items() if k in readable}
    write_build_script(stage, names, spec, batch=ctx.batch, timing_cache="../timing.cache")
    try:
        major = tensorrt_major()
    except TlegError:
        return  # no TensorRT here: build_engine.sh builds the engines on the target
    sources = {p.name: files[p.tensorrt_kind(major)] for p in PRECISION.values() if p.tensorrt_kind(major) in files}
    for precision, onnx_file in sources.items():
        build_tensorrt_engine(onnx_file, stage / f"model_{precision}.engine", spec=spec, precision=precision,
                              batch=ctx.batch, timing_cache=ctx.out_dir / "timing.cache")


def _latency(ctx: MemberContext, spec: ViTSpec, depth: int, precision: str, path: Path | None) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    prec = ONNX_KINDS[precision].precision  # the int8-qdq file runs at int8
    if ctx.profile is not None:
        try:
            p = ctx.profile.predict(depth, spec=spec, precision=prec)
            out["predicted"] = {"device": getattr(ctx.profile, "name", "?"), "source": p.source,
                                "p50_ms": p.latency_p50_ms, "p90_ms": p.latency_p90_ms,
                                "p90_upper_ms": p.latency_p90_upper_ms, "extrapolated": p.extrapolated}
        except TlegError:
            out["predicted"] = None
    if ctx.measure_latency and path is not None:
        from tleg_deploy.profile.artifact import measure_onnx

        out["measured"] = measure_onnx(path, spec, depth=depth, precision=precision).to_dict()
    return out or None
