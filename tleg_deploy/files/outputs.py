"""The output policy: where a command may write, checked before anything is written (STYLE.md 11).

- An output never is, contains or lies inside an input. Paths are compared resolved and by
  ``(st_dev, st_ino)``, so a symlink or a hard link to an input counts as the input.
- A non-regular file (``/dev/null``, a fifo, a socket) is never replaced; a directory never stands
  where a file is expected, nor a file where a directory is.
- An existing file is replaced only with ``force`` (then atomically, ``fileio.atomic_path``).
- An existing non-empty directory is reused only if it is ours: it holds our marker file with our
  ``format`` (an export ``manifest.json``, a fit ``plan.json``, a report's ``.tleg-report.json``).
  Then only the files we write are replaced; a user's file in it is kept, or, where the command
  replaces the directory as a whole (``fit``), the command refuses and names it. A non-empty
  directory that is not ours is written into only with ``force``, and even then only our own file
  names are touched (never for a whole-directory replacement).
- Directories we create honour the umask.

Every check raises ``OutputError`` (or ``FileNotFoundError`` / ``IsADirectoryError`` for inputs)
with a one-line message that names the user's path. Stdlib only.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from tleg_deploy.errors import OutputError
from tleg_deploy.files.fileio import file_kind, umask

PathLike = str | os.PathLike[str]
Owns = Callable[[str, bool], bool]  # (path relative to the directory, is a directory) -> written by us
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
FORCE_HINT = "pass --force to replace it"


# -- inputs ----------------------------------------------------------------------------------------
def input_file(path: PathLike, what: str = "input") -> Path:
    """``path`` as an existing regular file, or an error that says what it is instead."""
    p = Path(path)
    st = _stat(p)
    if st is None:
        raise FileNotFoundError(f"no such file: {p}")
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {p} is a directory, but a file is expected")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{what} {p} is {file_kind(st.st_mode)}, not a regular file", hint="pass a file")
    return p


def check_not_input(out: PathLike, inputs: Iterable[PathLike | None], what: str = "output") -> None:
    """Refuse an output that is an input (same path, symlink, hard link), a directory holding an
    input, or a path inside an input directory. Inputs that do not exist are skipped."""
    o = Path(out)
    o_res = o.resolve()
    o_st = _stat(o)
    for given in inputs:
        if given is None or not os.path.lexists(given):
            continue
        i = Path(given)
        i_res, i_st = i.resolve(), _stat(i)
        if o_res == i_res or (o_st is not None and i_st is not None and _same_file(o_st, i_st)):
            how = "is" if o.absolute() == i.absolute() else "is the same file as"  # via a symlink or hard link
            raise OutputError(f"{what} {o} {how} the input {i}; an output never replaces an input",
                              hint="choose another output path")
        if o_res in i_res.parents:
            raise OutputError(f"{what} {o} contains the input {i}; an output never holds an input",
                              hint="choose another output directory")
        if i_res in o_res.parents and i_st is not None and stat.S_ISDIR(i_st.st_mode):
            raise OutputError(f"{what} {o} lies inside the input directory {i}",
                              hint="choose an output outside it")


# -- outputs ---------------------------------------------------------------------------------------
def output_file(path: PathLike, *, inputs: Iterable[PathLike | None] = (), force: bool = False,
                what: str = "output") -> Path:
    """``path`` checked as a single-file output (module docstring); pass the raw string the user
    typed, so that ``""`` and a trailing ``/`` are still visible."""
    raw = os.fspath(path)
    if not raw.strip():
        raise OutputError(f"the {what} path is empty", hint="give a file name with -o")
    if raw.endswith(("/", os.sep)) or Path(raw).name in ("", ".", ".."):
        raise OutputError(f"{what} {raw!r} names a directory, but a file is expected",
                          hint="give a file name, e.g. -o out/model.safetensors")
    p = Path(raw)
    check_not_input(p, inputs, what)
    st = _stat(p)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{what} {p} is a directory, but a file is expected",
                              hint=f"give a file path, e.g. {p / 'NAME'}")
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{what} {p} is {file_kind(st.st_mode)}, not a regular file; it is never replaced",
                              hint="choose a file path")
        if not force:
            raise OutputError(f"{what} {p} already exists", hint=FORCE_HINT)
    _check_parents(p, what)
    return p


def output_dir(path: PathLike, *, inputs: Iterable[PathLike | None] = (), force: bool = False,
               ours: Callable[[Path], bool] = lambda _d: False, owns: Owns | None = None, whole: bool = False,
               what: str = "output directory") -> Path:
    """``path`` checked as an output directory (module docstring). ``ours(dir)``: the directory holds
    our marker. ``owns(rel, is_dir)``: a path inside it is one we write. ``whole``: the command
    replaces the directory as a whole, so every file in it must be ours (``force`` does not help)."""
    raw = os.fspath(path)
    if not raw.strip():
        raise OutputError(f"the {what} path is empty", hint="give a directory with -o")
    p = Path(raw)
    check_not_input(p, inputs, what)
    st = _stat(p)
    if st is None:
        _check_parents(p, what)
        return p
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{what} {p} is {file_kind(st.st_mode)}, but a directory is expected",
                          hint="choose a new directory name")
    entries = sorted(e.name for e in p.iterdir())
    if not entries:
        return p
    if ours(p):
        foreign = first_foreign(p, owns) if (owns is not None and whole) else None
        if foreign is not None:
            raise OutputError(f"{p / foreign} was not written by tleg-deploy, and a re-run replaces {p} as a whole",
                              hint=f"move it out of {p}, or choose another output directory")
        return p
    if force and not whole:
        return p
    raise OutputError(f"{what} {p} already holds files tleg-deploy did not write, e.g. {entries[0]}",
                      hint="choose a new or empty directory" + ("" if whole else
                           ", or pass --force to write into it; its other files are kept"))


def first_foreign(directory: Path, owns: Owns) -> str | None:
    """The first path under ``directory`` (sorted, top-down) that ``owns`` does not claim, or ``None``."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        base = Path(root).relative_to(directory)
        for name in sorted(files):
            rel = (base / name).as_posix()
            if not owns(rel, False):
                return rel
        for name in list(dirs):
            rel = (base / name).as_posix()
            if not owns(rel, True):
                return rel + "/"
    return None


def check_plain_name(name: str, what: str = "device name") -> str:
    """A name that becomes a file name (``profiles/NAME.json``): no ``/``, no ``..``, no hidden file."""
    if not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise OutputError(f"{what} {name!r} is not a plain name (letters, digits, '.', '_', '+', '-')",
                          hint="to write the file elsewhere, pass -o FILE")
    return name


def has_marker(directory: Path, name: str, fmt: str) -> bool:
    """``directory/name`` is a JSON object whose ``format`` is ``fmt``."""
    import json

    try:
        data = json.loads((directory / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == fmt


# -- placing outputs ---------------------------------------------------------------------------------
def make_dir(path: Path) -> Path:
    """``mkdir -p`` (the new directories get ``0o777 & ~umask``, as ``mkdir`` gives them)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def staging_dir(dest: Path) -> Path:
    """A new hidden directory next to ``dest`` to build it in, with the mode ``mkdir`` would give
    (``tempfile.mkdtemp`` makes 0700)."""
    make_dir(dest.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def move_files_into(stage: Path, final: Path, *, ours: Callable[[str], bool]) -> list[str]:
    """Put every file of ``stage`` into ``final``, one atomic rename each, and delete the files of
    ``final`` that ``ours(name)`` claims and ``stage`` does not have. Other files in ``final`` (a
    user's) stay where they are. ``stage`` is removed; returns the names placed."""
    names = sorted(e.name for e in stage.iterdir())
    if not os.path.lexists(final):
        os.replace(stage, final)
        return names
    if not final.is_dir() or final.is_symlink():
        raise OutputError(f"{final} is not a directory", hint=f"move it away; it is where {stage.name} goes")
    for name in names:
        st = _stat(final / name, follow=False)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{final / name} is {file_kind(st.st_mode)}, where tleg-deploy writes a file",
                              hint=f"move it out of {final}")
    for old in final.iterdir():
        if old.name not in names and ours(old.name) and old.is_file() and not old.is_symlink():
            old.unlink()
    for name in names:
        os.replace(stage / name, final / name)
    stage.rmdir()
    return names


# -- helpers -----------------------------------------------------------------------------------------
def _stat(p: Path, follow: bool = True) -> os.stat_result | None:
    try:
        return p.stat() if follow else p.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:  # a symlink loop, a name too long: say so with the user's path
        raise OutputError(f"cannot use {p}: {e.strerror or e}") from None


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _check_parents(p: Path, what: str) -> None:
    """The nearest existing ancestor of ``p`` must be a directory (it is where ``p`` will be created)."""
    for parent in p.absolute().parents:
        st = _stat(parent)
        if st is None:
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {what} {p}: {parent} is {file_kind(st.st_mode)}, not a directory",
                              hint="choose another output path")
        return
