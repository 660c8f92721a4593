"""``export_family``: export and validate a whole family of depths from one learngene.

One directory per depth (``depth_03/model.onnx``, its variants, their validation reports and
``build_engine.sh``) and ``manifest.json`` at the top (DESIGN.md §4): the learngene's sha256 and
spec, and one entry per artifact with depth, precision, file, bytes, sha256, params, MACs
(``tleg_deploy.plan.costs``), parity with PyTorch, and predicted / measured latency when asked for.
The manifest also records what the paper calls storage savings: the learngene's bytes and
parameters against the family's.

Robustness: a member is built in a hidden staging directory and renamed into place only after
every file in it has been written and validated; the manifest is rewritten atomically after each
member, so at any moment (Ctrl-C, crash) every file it claims exists and matches its sha256. A
re-run skips members whose files still match and redoes the rest. A lock file makes a second
concurrent run into the same directory fail with a clear error instead of interleaving writes.

Speed: the members share one block structure, so the ONNX graphs come from one exported depth-2
probe (``export.template.DepthTemplate``) instead of one exporter trace per member, and only the
first template-built member of depth >= 2 (and any shallower one before it) gets the full
``validate_onnx``; the others get ``validate_member``: structure identical to the template's
expansion, every weight bitwise equal to the model's, ONNX Runtime vs PyTorch at batch 1. Each
validation report records its ``mode``; int8/fp16 variants keep their own validation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tleg_deploy.errors import DepthError, ExportError, TlegError
from tleg_deploy.export.manifest import (
    FORMATS,
    LOCK_NAME,
    MANIFEST_NAME,
    directory_lock,
    load_manifest,
    member_is_intact,
    new_manifest,
    write_manifest,
)
from tleg_deploy.files.fileio import sha256_file
from tleg_deploy.files.outputs import move_files_into, output_dir
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.plan import costs
from tleg_deploy.plan.precisions import ONNX_KINDS, PRECISION, PRECISIONS

Progress = Callable[[str, int, int], None]


# -- parsing user input (torch-free) -------------------------------------------------------------
def parse_depths(text: str, *, maximum: int = MAX_DEPTH) -> list[int]:
    """``"1-12"``, ``"2,4,8"``, ``"1-24:2"`` (start-stop:step, inclusive) or mixes like ``"1-4,8"``.
    The one depth-list parser of every command; an empty item (``"1,,2"``) is an error, not skipped."""
    depths: set[int] = set()
    parts = str(text).replace(" ", "").split(",")
    if parts == [""]:
        raise DepthError("no depths given", hint="e.g. --depths 1-12")
    for part in parts:
        if not part:
            raise DepthError(f"cannot read depths {text!r}: an empty item",
                             hint="write them like 1-12, 2,4,8 or 1-24:2")
        try:
            span, _, step_s = part.partition(":")
            lo_s, dash, hi_s = span.partition("-")
            lo = int(lo_s)
            hi = int(hi_s) if dash else lo
            step = int(step_s) if step_s else 1
        except ValueError:
            raise DepthError(f"cannot read depths {text!r}", hint="write them like 1-12, 2,4,8 or 1-24:2") from None
        if step < 1 or hi < lo:
            raise DepthError(f"bad depth range {part!r}", hint="use start-stop:step with start <= stop, step >= 1")
        for d in range(lo, hi + 1, step):
            depths.add(check_depth(d, maximum=maximum))
    if not depths:
        raise DepthError(f"no depths in {text!r}", hint="e.g. --depths 1-12")
    return sorted(depths)


def parse_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """Validated format names in canonical order; ``onnx`` (fp32, the base of the others) is always in."""
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [n.strip().lower() for n in names if n.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ExportError(f"unknown format {unknown[0]!r}", hint=f"choose from {','.join(FORMATS)}")
    return tuple(f for f in FORMATS if f in names or f == "onnx")


# -- exporting -------------------------------------------------------------------------------------------
@dataclass
class _Context:
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
    proven_by: str | None = None  # the template-built member (depth >= 2) that passed the full validation
    _images: Any = None
    _calibration: Any = None

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


def export_family(
    lg: Any,
    depths: Sequence[int],
    out_dir: str | os.PathLike[str],
    formats: str | Iterable[str] = ("onnx",),
    *,
    data: str | None = "digits",
    learngene_file: str | os.PathLike[str] | None = None,
    models: Mapping[int, Any] | None = None,
    source: str = "expand",
    batch: Any = None,
    profile: Any = None,
    measure_latency: bool = False,
    use_template: bool = True,
    exporter: str = "auto",
    progress: Progress | None = None,
    force: bool = False,
    card: Any = None,
    skip_precisions: Iterable[str] = (),
    workers: int | None = None,
) -> dict[str, Any]:
    """Export and validate ``depths`` of ``lg`` into ``out_dir``; returns the manifest.

    ``models`` maps a depth to a model to export instead of ``expand(lg, depth)`` (fine-tuned
    weights; ``source`` then names them, and a re-run redoes members whose source differs).
    ``data`` gives the real images int8/fp16 are validated on and the int8 calibration set.
    ``profile`` (a ``DeviceProfile``) adds predicted latencies; ``measure_latency`` measures the
    ONNX Runtime latency of every ONNX file here (1 thread, batch 1).
    ``out_dir`` must be new, empty or an export directory (it has a ``manifest.json``); ``force``
    allows another directory. Only our files are replaced: a user's file in it, or in a
    ``depth_NN/`` of it, is kept (``files.outputs``).
    ``exporter`` is ``export_onnx``'s (``auto``, ``torchscript`` or ``dynamo``); the depth template
    works with either. ``card`` (a ``files.datacard.DataCard``; default: the learngene's) goes into
    every ONNX file's metadata and ``labels.json``, which every export directory holds. Variants that
    compute in one of ``skip_precisions`` (e.g. ``int8`` after it failed validation) are not written.
    ``workers``: members built and validated at once, in threads (default: up to 4, one per core); the
    first member that proves the template (full validation) runs alone first, and members are committed
    to the directory and the manifest one at a time in depth order, exactly as with one worker. One worker
    when TensorRT engines are built (they share a timing cache), latencies are measured, or members are
    exported one by one (no template: torch's exporter is not thread-safe).
    """
    from tleg_deploy.export.onnx import EXPORTERS
    from tleg_deploy.export.tensorrt import BatchRange

    fmts = parse_formats(formats)
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}", hint=f"choose one of {', '.join(EXPORTERS)}")
    depths = sorted({check_depth(d) for d in depths})
    if not depths:
        raise DepthError("no depths to export")
    out = Path(out_dir)
    for d, m in (models or {}).items():
        if getattr(m, "spec", None) != lg.spec:
            raise ExportError(f"the model given for depth {d} has another spec than the learngene")
        if getattr(m, "depth", None) != d:
            raise ExportError(f"the model given for depth {d} has depth {getattr(m, 'depth', '?')}")
    check_export_dir(out, inputs=[learngene_file], force=force)  # library callers too, not only the CLI
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise ExportError(f"cannot create {out}: permission denied",
                          hint="choose a writable output directory") from None
    except OSError as e:
        raise ExportError(f"cannot create {out}: {e.strerror or e}", hint="choose another output directory") from None
    if not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory", hint="choose another output directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {out}: permission denied", hint="choose a writable output directory")
    batch = batch or BatchRange()
    try:
        return _export_locked(lg, depths, out, fmts, batch, data, learngene_file, models, source, profile,
                              measure_latency, use_template, progress, exporter,
                              card if card is not None else getattr(lg, "data", None), frozenset(skip_precisions),
                              workers)
    except BaseException:
        if created:  # a directory this call made and that holds nothing but the (released) lock: leave no trace
            with contextlib.suppress(OSError):
                if [p.name for p in out.iterdir()] == [LOCK_NAME]:
                    (out / LOCK_NAME).unlink()
                out.rmdir()
        raise


def check_export_dir(out: str | os.PathLike[str], *, inputs: Iterable[Any] = (), force: bool = False) -> Path:
    """Where ``export_family`` may write (``files.outputs``): a new or empty directory, an export
    directory (it has a ``manifest.json`` or the export lock), or with ``force`` any directory;
    never one holding an input."""

    def ours(d: Path) -> bool:  # a lock alone: a first run is writing it (the lock then says who)
        return (d / MANIFEST_NAME).is_file() or (d / LOCK_NAME).is_file()

    return output_dir(out, inputs=inputs, force=force, ours=ours)


def _export_locked(
    lg: Any, depths: list[int], out: Path, fmts: tuple[str, ...], batch: Any, data: str | None,
    learngene_file: str | os.PathLike[str] | None, models: Mapping[int, Any] | None, source: str, profile: Any,
    measure_latency: bool, use_template: bool, progress: Progress | None, exporter: str = "auto",
    card: Any = None, skip: frozenset[str] = frozenset(), workers: int | None = None,
) -> dict[str, Any]:
    lg_sha = lg.sha256()
    with directory_lock(out):
        manifest = load_manifest(out)
        if manifest is not None and manifest["learngene"].get("sha256") != lg_sha:
            raise ExportError(f"{out} holds a family of another learngene ({manifest['learngene'].get('sha256')})",
                              hint="export to another directory, or delete that one")
        if manifest is None:
            manifest = new_manifest(lg, learngene_file, fmts, batch, lg_sha)
        _clean_staging(out)
        todo = []
        for d in depths:
            member = manifest["members"].get(str(d))
            fresh = (member is not None and member.get("source") == source
                     and set(fmts) <= set(member.get("formats", [])) and member_is_intact(out, member))
            if not fresh:
                todo.append(d)
        template = None
        if use_template and todo and (models is None or any(d not in models for d in todo)):
            from tleg_deploy.export.template import DepthTemplate

            with contextlib.suppress(ExportError):  # unexpected graph: fall back to one export per member
                template = DepthTemplate(lg.spec, exporter=exporter)
        ctx = _Context(out, fmts, lg_sha, data, batch, profile, measure_latency, template, exporter, card=card,
                       skip=skip)
        done = len(depths) - len(todo)
        if progress:
            progress(f"{done} of {len(depths)} members already exported", done, len(depths))

        def member(d: int) -> Any:
            return models[d] if models and d in models else _expand(lg, d)

        # torch.onnx.export keeps global state: members run in threads only when the template builds them
        n_workers = _workers(workers, fmts, measure_latency) if template is not None else 1
        queue = list(todo)
        # Alone first: every member until one has proven the template (the others' validation cites it).
        while queue and (n_workers == 1 or (ctx.template is not None and ctx.proven_by is None)):
            d = queue.pop(0)
            if progress:
                progress(f"depth {d}", done, len(depths))
            _commit_member(ctx, manifest, *_stage_member(ctx, member(d)), source)
            done += 1
            if progress:
                progress(f"depth {d} done", done, len(depths))
        if queue:
            _prefetch(ctx, lg.spec)  # the lazily loaded images, once, before threads share them
            # closing(): the pool is shut down and uncommitted staging removed before the lock is released
            with contextlib.closing(_staged_in_parallel(ctx, queue, member, n_workers)) as staged_members:
                for d, staged in staged_members:
                    _commit_member(ctx, manifest, *staged, source)
                    done += 1
                    if progress:
                        progress(f"depth {d} done", done, len(depths))
        _write_labels(out, card, lg.spec)
        return manifest


def _workers(workers: int | None, fmts: tuple[str, ...], measure_latency: bool) -> int:
    if "tensorrt" in fmts or measure_latency:
        return 1  # engines share a timing cache; latencies are timed alone
    if workers is None:
        return max(1, min(4, os.cpu_count() or 1))
    if workers < 1:
        raise ExportError(f"workers must be >= 1, got {workers}")
    return workers


def _prefetch(ctx: _Context, spec: ViTSpec) -> None:
    if ctx.data is None:
        return  # a variant that needs images fails in its member, naming the missing data
    if ({"int8", "fp16", "tensorrt"} & set(ctx.formats)) - ctx.skip:
        ctx.images(spec)
    if "tensorrt" in ctx.formats:
        ctx.calibration(spec)


def _staged_in_parallel(ctx: _Context, depths: list[int], member: Callable[[int], Any],
                        n_workers: int) -> Iterator[tuple[int, tuple[int, Path, list[dict[str, Any]]]]]:
    """Build and validate ``depths`` (``_stage_member``) in ``n_workers`` threads; yield them in depth order as
    each is ready. On an error or Ctrl-C the members not started are cancelled, the running ones finish,
    and every staging directory not yet committed is removed."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="tleg-export")
    futures = [pool.submit(lambda d=d: _stage_member(ctx, member(d))) for d in depths]
    committed = 0
    try:
        for d, fut in zip(depths, futures, strict=True):
            yield d, fut.result()
            committed += 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for d, fut in zip(depths[committed:], futures[committed:], strict=True):
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                shutil.rmtree(fut.result()[1], ignore_errors=True)
            shutil.rmtree(ctx.out_dir / f".{_member_dir(d)}.partial", ignore_errors=True)


def _write_labels(out: Path, card: Any, spec: ViTSpec) -> None:
    """``labels.json``: class names and preprocessing (assumed ones, said so, without a card); a
    ``labels.json`` we did not write is left alone."""
    from tleg_deploy.files.datacard import LABELS_FORMAT, LABELS_NAME, unknown_labels_json
    from tleg_deploy.files.fileio import write_json_atomic

    path = out / LABELS_NAME
    if path.exists() or path.is_symlink():
        try:
            ours = path.is_file() and json.loads(path.read_text()).get("format") == LABELS_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            return
    doc = card.labels_json() if card is not None else unknown_labels_json(spec.num_classes, spec.img_size,
                                                                           spec.in_chans)
    write_json_atomic(path, doc)


def _expand(lg: Any, depth: int) -> Any:
    from tleg_deploy.model.expansion import expand

    return expand(lg, depth).eval()


def _member_dir(depth: int) -> str:
    return f"depth_{depth:02d}"


_MEMBER_FILE = re.compile(r"model(_\w+)?\.(onnx|engine)|model(_\w+)?\.validation\.json|build_engine\.sh")


def is_member_file(name: str) -> bool:
    """A file name ``_build_member`` writes into a ``depth_NN/`` (so a re-run may replace it)."""
    return _MEMBER_FILE.fullmatch(name) is not None


def _clean_staging(out: Path) -> None:
    for p in out.glob(".depth_*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def _stage_member(ctx: _Context, model: Any) -> tuple[int, Path, list[dict[str, Any]]]:
    """Build and validate one member into its hidden staging directory (thread-safe: nothing shared is
    written); returns its depth, the staging directory and its artifact entries."""
    depth = model.depth
    stage = ctx.out_dir / f".{_member_dir(depth)}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        return depth, stage, _build_member(ctx, model, stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _commit_member(ctx: _Context, manifest: dict[str, Any], depth: int, stage: Path,
                   artifacts: list[dict[str, Any]], source: str) -> None:
    """Move a staged member into ``depth_NN/`` and record it in the manifest (one member at a time)."""
    name = _member_dir(depth)
    final = ctx.out_dir / name
    try:
        # Forget the old member first, so the manifest never claims files that are being replaced.
        if str(depth) in manifest["members"]:
            _drop_member(manifest, depth)
            write_manifest(ctx.out_dir, manifest)
        placed = move_files_into(stage, final, ours=is_member_file)  # a user's file in `final` stays
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    files = {f"{name}/{n}": sha256_file(final / n) for n in placed}
    for a in artifacts:
        a["file"] = f"{name}/{a['file']}"
        a["sha256"] = files[a["file"]]
    manifest["members"][str(depth)] = {"dir": name, "source": source, "formats": list(ctx.formats), "files": files}
    manifest["artifacts"].extend(artifacts)
    order = tuple(ONNX_KINDS)
    manifest["artifacts"].sort(key=lambda a: (a["depth"], a["format"] != "onnx", order.index(a["precision"])))
    write_manifest(ctx.out_dir, manifest)


def _drop_member(manifest: dict[str, Any], depth: int) -> None:
    manifest["members"].pop(str(depth), None)
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["depth"] != depth]


def _build_member(ctx: _Context, model: Any, stage: Path) -> list[dict[str, Any]]:
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
    if ctx.template is not None and ctx.proven_by is not None:
        reports = {"fp32": validate_member(fp32, model, ctx.template, proven_by=ctx.proven_by)}
    else:
        reports = {"fp32": validate_onnx(fp32, model, precision="fp32")}
        if ctx.template is not None and depth >= 2:  # covers block 0, a copied block and the chaining
            ctx.proven_by = f"{_member_dir(depth)}/model.onnx"
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


def _tensorrt(ctx: _Context, spec: ViTSpec, stage: Path, files: dict[str, Path]) -> None:
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


def _latency(ctx: _Context, spec: ViTSpec, depth: int, precision: str, path: Path | None) -> dict[str, Any] | None:
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


