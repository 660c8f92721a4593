"""The export manifest (``manifest.json``, DESIGN.md §4) and the directory lock.

Every export directory — a family from ``export_family``, one depth from ``tleg-deploy export`` or
the output of ``fit`` — carries one manifest of this format: the learngene's sha256 and spec, and
one entry per artifact (depth, precision, file, bytes, sha256, params, MACs, parity with PyTorch,
predicted / measured latency), plus the learngene-vs-family storage figures. Loading is strict
(``tleg_deploy.files.schema``): unknown or missing keys, wrong types, non-finite numbers, malformed
sha256s and member paths that leave the directory make a corrupted or foreign manifest an
``ExportError`` naming the field.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tleg_deploy.errors import ExportError, FormatError
from tleg_deploy.files import schema
from tleg_deploy.files.fileio import sha256_file, write_json_atomic
from tleg_deploy.plan.precisions import ONNX_KINDS

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "tleg-export-manifest"
MANIFEST_VERSION = "1"
LOCK_NAME = ".tleg-export.lock"
FORMATS = ("onnx", "int8", "fp16", "tensorrt")
_MANIFEST_KEYS = {"format", "schema_version", "tool_version", "updated", "learngene", "spec", "spec_preset",
                  "formats", "batch", "members", "artifacts", "storage"}
_LEARNGENE_KEYS = {"sha256", "tensor_bytes", "params"}
_LEARNGENE_OPTIONAL = {"file", "file_bytes", "aux_depth"}
_MEMBER_KEYS = {"dir", "source", "formats", "files"}
_ARTIFACT_KEYS = {"depth", "precision", "format", "file", "bytes", "sha256", "params", "macs", "parity", "latency"}


# -- the lock --------------------------------------------------------------------------------------
@contextlib.contextmanager
def directory_lock(out_dir: Path) -> Iterator[Path]:
    """Hold ``out_dir/.tleg-export.lock`` for one export; a second export of the same directory
    refuses at once with an ``ExportError``.

    The lock is ``filelock``'s (``flock`` on POSIX): the kernel releases it when its holder exits,
    however it exits, so there is no stale lock to detect or take over. The file itself stays in
    place after release (unlinking it would let a waiter lock a deleted inode while a newcomer locks
    a new one) and its contents mean nothing: only the OS lock on it counts.
    """
    from filelock import FileLock, Timeout

    path = out_dir / LOCK_NAME
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ExportError(f"{out_dir} is being written by another export (it holds {path.name})",
                          hint="wait for it to finish; its lock is released when that process ends") from None
    except PermissionError:
        raise ExportError(f"cannot write to {out_dir}: permission denied",
                          hint="choose a writable output directory") from None
    try:
        yield path
    finally:
        lock.release()


# -- the manifest ------------------------------------------------------------------------------------
def load_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest in ``out_dir``, ``None`` if there is none, ``ExportError`` if it is corrupted:
    every key, type and member path is checked (a member file must lie inside ``out_dir``)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.exists():
        return None
    hint = "delete it to start over, or export to another directory"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} is corrupted: {str(e).splitlines()[0][:120]}", hint=hint) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path} is not a tleg-deploy export manifest", hint=hint)
    try:
        check_manifest(data)
    except FormatError as e:
        if e.message.startswith("field 'schema_version'"):
            raise ExportError(f"{path} has schema_version {data.get('schema_version')!r}, expected "
                              f"{MANIFEST_VERSION!r}", hint=hint) from None
        raise ExportError(f"{path} is corrupted: {e.message}", hint=hint) from None
    return data


def check_manifest(data: Any) -> None:
    """Strict structure of a manifest (``FormatError`` naming the field)."""
    schema.header(data, "a manifest", MANIFEST_FORMAT, MANIFEST_VERSION)
    schema.obj(data, "manifest", _MANIFEST_KEYS)
    schema.finite_numbers(data, "manifest")
    lg = schema.obj(data["learngene"], "learngene", _LEARNGENE_KEYS, _LEARNGENE_OPTIONAL)
    schema.sha256_hex(lg["sha256"], "learngene.sha256")
    for key in ("tensor_bytes", "params"):
        schema.integer(lg[key], f"learngene.{key}", minimum=0)
    schema.obj(data["spec"], "spec", None)
    for i, f in enumerate(schema.lst(data["formats"], "formats")):
        schema.choice(schema.string(f, f"formats[{i}]"), FORMATS, f"field 'formats[{i}]'")
    batch = schema.obj(data["batch"], "batch", {"min", "opt", "max"})
    for key in ("min", "opt", "max"):
        schema.integer(batch[key], f"batch.{key}", minimum=1)
    schema.obj(data["storage"], "storage", None)
    for depth, member in schema.obj(data["members"], "members", None).items():
        where = f"members.{depth}"
        if not depth.isdigit():
            raise FormatError(f"field 'members' has key {depth!r}, not a depth")
        m = schema.obj(member, where, _MEMBER_KEYS)
        schema.relative_path(m["dir"], f"{where}.dir")
        schema.string(m["source"], f"{where}.source")
        schema.lst(m["formats"], f"{where}.formats")
        for rel, sha in schema.obj(m["files"], f"{where}.files", None).items():
            schema.relative_path(rel, f"{where}.files")
            schema.sha256_hex(sha, f"{where}.files.{rel}")
    for i, a in enumerate(schema.lst(data["artifacts"], "artifacts")):
        where = f"artifacts[{i}]"
        schema.obj(a, where, _ARTIFACT_KEYS)
        schema.integer(a["depth"], f"{where}.depth", minimum=1)
        schema.choice(schema.string(a["precision"], f"{where}.precision"), tuple(ONNX_KINDS),
                      f"field '{where}.precision'")
        schema.choice(schema.string(a["format"], f"{where}.format"), ("onnx", "tensorrt"), f"field '{where}.format'")
        schema.relative_path(a["file"], f"{where}.file")
        schema.sha256_hex(a["sha256"], f"{where}.sha256")
        for key in ("bytes", "params", "macs"):
            schema.integer(a[key], f"{where}.{key}", minimum=0)
        for key in ("parity", "latency"):
            if a[key] is not None:
                schema.obj(a[key], f"{where}.{key}", None)


def member_is_intact(out_dir: Path, member: Mapping[str, Any]) -> bool:
    """Every file the member claims exists and matches its recorded sha256."""
    files = member.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for rel, sha in files.items():
        path = out_dir / rel
        if not path.is_file() or sha256_file(path) != sha:
            return False
    return True


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_manifest(lg: Any, learngene_file: str | os.PathLike[str] | None, fmts: tuple[str, ...], batch: Any,
                 sha256: str | None = None) -> dict:
    """A fresh manifest; ``sha256``: the learngene's, when the caller already has it (hashing is a full pass)."""
    from tleg_deploy import __version__

    file_bytes = Path(learngene_file).stat().st_size if learngene_file and Path(learngene_file).is_file() else None
    return {
        "format": MANIFEST_FORMAT, "schema_version": MANIFEST_VERSION, "tool_version": f"tleg-deploy {__version__}",
        "updated": _now(),
        "learngene": {"sha256": sha256 or lg.sha256(), "file": str(learngene_file) if learngene_file else None,
                      "file_bytes": file_bytes, "tensor_bytes": lg.nbytes(), "params": lg.num_params(),
                      "aux_depth": lg.aux_depth},
        "spec": lg.spec.to_dict(), "spec_preset": lg.spec.preset_name(), "formats": list(fmts),
        "batch": {"min": batch.min, "opt": batch.opt, "max": batch.max},
        "members": {}, "artifacts": [], "storage": {},
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = _now()
    manifest["formats"] = sorted({f for m in manifest["members"].values() for f in m.get("formats", [])},
                                 key=FORMATS.index)
    manifest["storage"] = storage_summary(manifest)
    write_json_atomic(out / MANIFEST_NAME, manifest)


def storage_summary(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Learngene vs family: bytes (all files, and fp32 ONNX only) and parameters."""
    lg = manifest["learngene"]
    arts = manifest["artifacts"]
    lg_bytes = lg.get("file_bytes") or lg["tensor_bytes"]
    fp32 = [a for a in arts if a["precision"] == "fp32" and a["format"] == "onnx"]
    fp32_bytes = sum(a["bytes"] for a in fp32)
    params = sum(a["params"] for a in fp32)
    all_bytes = sum(a["bytes"] for a in arts)
    return {
        "learngene_bytes": lg_bytes, "learngene_params": lg["params"], "members": len(fp32),
        "family_bytes": all_bytes, "family_fp32_onnx_bytes": fp32_bytes, "family_params": params,
        "fp32_bytes_ratio": round(fp32_bytes / lg_bytes, 3) if lg_bytes else None,
        "params_ratio": round(params / lg["params"], 3) if lg["params"] else None,
    }
