"""Reading and writing our safetensors files with strict, versioned metadata (DESIGN.md §4).

Every file carries ``format`` and ``schema_version`` in its safetensors metadata; readers reject
other formats, unknown versions, and missing or extra metadata keys, naming the key; keys added
after version 1 (the ``data`` card) are ``optional``, so older files still load. No pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tleg_deploy.errors import FormatError, key_mismatch
from tleg_deploy.files.fileio import atomic_path, safetensors_metadata

SCHEMA_VERSION = "1"


def write_tensor_file(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], fmt: str, meta: dict[str, str]
) -> None:
    """Write ``tensors`` with ``format=fmt`` and ``schema_version`` added to ``meta``, atomically."""
    metadata = {"format": fmt, "schema_version": SCHEMA_VERSION, **meta}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors file, or a ``FormatError`` saying why it is not one."""
    p = _existing(path)
    try:
        return safetensors_metadata(p)
    except ValueError as e:
        raise FormatError(f"{p} is not a readable safetensors file: {_short(e)}") from None


def read_tensor_file(
    path: str | os.PathLike[str], fmt: str, meta_keys: set[str], optional: frozenset[str] = frozenset()
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file of format ``fmt`` whose metadata must hold exactly ``meta_keys`` (plus
    ``format``, ``schema_version`` and any of ``optional``). Returns ``(tensors, metadata)``."""
    p = _existing(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            check_metadata(p, meta, fmt, meta_keys, optional)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{p} is not a readable safetensors file: {_short(e)}") from None
    return tensors, meta


def check_metadata(path: Path, meta: dict[str, str], fmt: str, meta_keys: set[str],
                   optional: frozenset[str] = frozenset()) -> None:
    found = meta.get("format")
    if found != fmt:
        raise FormatError(
            f"{path} has format {found!r}, expected {fmt!r}",
            hint="check that you passed the right file",
        )
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FormatError(
            f"{path} has schema_version {version!r}; this tleg-deploy reads {SCHEMA_VERSION!r}",
            hint="upgrade tleg-deploy or re-create the file",
        )
    present = {k: v for k, v in meta.items() if k not in optional}
    if problem := key_mismatch(present, meta_keys | {"format", "schema_version"}):
        raise FormatError(f"{path} metadata {problem}")


def check_tensors(
    path: object, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> None:
    """Exactly the expected names, each of the expected shape and a floating dtype."""
    if problem := key_mismatch(tensors, expected, "tensor"):
        raise FormatError(f"{path} {problem}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise FormatError(
                f"{path} tensor {name!r} has shape {tuple(t.shape)}, expected {shape}"
            )
        if not t.is_floating_point():
            raise FormatError(f"{path} tensor {name!r} has dtype {t.dtype}, expected a float")


def _existing(path: str | os.PathLike[str]) -> Path:
    from tleg_deploy.files.outputs import input_file

    return input_file(path)


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
