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
shallowest template-built member of depth >= 2 (the prover: block 0, a copied block and the
chaining, every node any member has) gets the full ``validate_onnx``; the others get
``validate_member``: structure identical to the template's expansion, every weight bitwise equal to
the model's, ONNX Runtime vs PyTorch at batch 1. Each validation report records its ``mode``;
int8/fp16 variants keep their own validation. Building one member, and several at once in workers,
is ``export.member``; this module orders and commits them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tleg_deploy.errors import DepthError, ExportError
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
from tleg_deploy.export.member import (
    MemberContext,
    Staged,
    is_member_file,
    member_dir,
    prefetch,
    stage_member,
    staged_in_parallel,
    workers_for,
)
from tleg_deploy.files.outputs import move_files_into, output_dir
from tleg_deploy.model.spec import MAX_DEPTH, ViTSpec, check_depth
from tleg_deploy.plan.precisions import ONNX_KINDS

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
    ``workers``: members built and validated at once, in forked worker processes (threads where the
    platform cannot fork; default: up to 4, one per core). The member that proves the template (full
    validation) starts first and is committed first; the others are committed only after it passed, one
    at a time as each is ready (the manifest lists them by depth, as with one worker). One worker when
    TensorRT engines are built (they share a timing cache), latencies are measured, or members are
    exported one by one (no template: torch's exporter keeps global state).
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
            from tleg_deploy.export.template import shared_template

            with contextlib.suppress(ExportError):  # unexpected graph: fall back to one export per member
                template = shared_template(lg.spec, exporter=exporter)
        ctx = MemberContext(out, fmts, lg_sha, data, batch, profile, measure_latency, template, exporter, card=card,
                       skip=skip)
        done = len(depths) - len(todo)
        if progress:
            progress(f"{done} of {len(depths)} members already exported", done, len(depths))

        def member(d: int) -> Any:
            return models[d] if models and d in models else _expand(lg, d)

        # torch.onnx.export keeps global state: members run in parallel only when the template builds them
        n_workers = workers_for(workers, fmts, measure_latency) if template is not None else 1
        # The first member of depth >= 2 (block 0, a copied block and the chaining) gets the full validation
        # and is committed first; the others' validation cites it.
        ctx.prover = next((d for d in todo if d >= 2), None) if template is not None else None
        queue = sorted(todo, key=lambda d: d != ctx.prover)  # the prover first, then by depth
        if n_workers == 1 or len(queue) == 1:
            for d in queue:
                if progress:
                    progress(f"depth {d}", done, len(depths))
                _commit_member(ctx, manifest, stage_member(ctx, member(d)), source)
                done += 1
                if progress:
                    progress(f"depth {d} done", done, len(depths))
        elif queue:
            prefetch(ctx, lg.spec)  # the lazily loaded images, once, before the workers share them
            # closing(): the pool is shut down and uncommitted staging removed before the lock is released
            with contextlib.closing(staged_in_parallel(ctx, queue, member, n_workers)) as staged_members:
                for staged in staged_members:
                    _commit_member(ctx, manifest, staged, source)
                    done += 1
                    if progress:
                        progress(f"depth {staged.depth} done", done, len(depths))
        _write_labels(out, card, lg.spec)
        return manifest


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


def _clean_staging(out: Path) -> None:
    for p in out.glob(".depth_*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def _commit_member(ctx: MemberContext, manifest: dict[str, Any], staged: Staged, source: str) -> None:
    """Move a staged member into ``depth_NN/`` and record it in the manifest (one member at a time)."""
    depth, stage, artifacts = staged.depth, staged.stage, staged.artifacts
    name = member_dir(depth)
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
    files = {f"{name}/{n}": staged.sha256[n] for n in placed}  # renamed, not rewritten: the staged bytes
    for a in artifacts:
        a["file"] = f"{name}/{a['file']}"
        a["sha256"] = files[a["file"]]
    manifest["members"][str(depth)] = {"dir": name, "source": source, "formats": list(ctx.formats), "files": files}
    manifest["members"] = dict(sorted(manifest["members"].items(), key=lambda kv: int(kv[0])))  # any commit order
    manifest["artifacts"].extend(artifacts)
    order = tuple(ONNX_KINDS)
    manifest["artifacts"].sort(key=lambda a: (a["depth"], a["format"] != "onnx", order.index(a["precision"])))
    write_manifest(ctx.out_dir, manifest)


def _drop_member(manifest: dict[str, Any], depth: int) -> None:
    manifest["members"].pop(str(depth), None)
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["depth"] != depth]

