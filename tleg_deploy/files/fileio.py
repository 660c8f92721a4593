"""Atomic file writes: write to a temporary file in the target's directory, then rename.

A crash or Ctrl-C leaves either the old file or the new one, never half of one; the temporary file
is removed. A target that exists and is not a regular file (``/dev/null``, a fifo, a directory) is
never replaced, and an ``OSError`` names the target, not the temporary file. Whether a target may
be replaced at all is the output policy's question (``files.outputs``). Stdlib only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tleg_deploy.errors import NonFiniteError

_MAX_HEADER = 100_000_000


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    target = Path(path)
    _check_replaceable(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _naming(e, target) from None
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; give the usual mode
        _check_replaceable(target)  # it may have appeared while we wrote
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and tmp in (e.filename, e.filename2):
            raise _naming(e, target) from None
        raise


def _check_replaceable(target: Path) -> None:
    from tleg_deploy.errors import OutputError

    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(mode):
        raise OutputError(f"{target} is {file_kind(mode)}, not a regular file; it is never replaced",
                          hint="choose another output path")


def _naming(e: OSError, target: Path) -> OSError:
    """The same error, naming ``target`` (the user's path) instead of our temporary file."""
    return type(e)(e.errno, e.strerror, str(target))


def file_kind(mode: int) -> str:
    """``'a directory'``, ``'a character device'``, ... for an ``st_mode``."""
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a fifo (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as JSON, atomically. NaN or infinity anywhere in it is refused (``NonFiniteError``,
    nothing written): bare ``NaN`` is not JSON, and a non-finite figure must never read as a result."""
    try:
        text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as e:
        raise NonFiniteError(f"refusing to write {os.fspath(path)}: a number in it is NaN or infinite ({e})",
                             hint="a measurement or weight went non-finite upstream; nothing was written") from None
    write_text_atomic(path, text + "\n")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its JSON header without importing torch.
    ``FileNotFoundError`` if missing, ``ValueError`` if the file is not safetensors."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < _MAX_HEADER:
            raise ValueError(f"implausible header size {size}")
        try:
            header = json.loads(f.read(size))
        except UnicodeDecodeError as e:
            raise ValueError(f"header is not UTF-8 JSON: {e}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(header, dict) or not isinstance(meta or {}, dict):
        raise ValueError("header is not a JSON object")
    return {str(k): str(v) for k, v in (meta or {}).items()}
