"""The output policy (tleg_deploy.files.outputs) and the atomic writer it relies on, unit by unit.
The commands' behaviour on bad paths is walked in test_reliability.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tleg_deploy.errors import OutputError
from tleg_deploy.files import fileio
from tleg_deploy.files.outputs import (
    check_not_input,
    check_plain_name,
    first_foreign,
    input_file,
    move_files_into,
    output_dir,
    output_file,
    staging_dir,
)


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    (tmp_path / "in.bin").write_bytes(b"input")
    (tmp_path / "user.txt").write_text("mine")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "inner.bin").write_bytes(b"inner")
    os.link(tmp_path / "in.bin", tmp_path / "hard.bin")
    (tmp_path / "soft.bin").symlink_to("in.bin")
    os.mkfifo(tmp_path / "fifo")
    return tmp_path


def test_output_file_refuses(ws: Path) -> None:
    cases = {
        "": "path is empty", "   ": "path is empty", "newdir/": "names a directory", ".": "names a directory",
        "..": "names a directory", f"{ws}/.": "is a directory",
        str(ws / "d"): "is a directory", str(ws / "fifo"): "is a fifo", "/dev/null": "is a character device",
        str(ws / "user.txt"): "already exists", str(ws / "user.txt" / "x"): "is a regular file, not a directory",
    }
    for path, needle in cases.items():
        with pytest.raises(OutputError, match=needle):
            output_file(path)
    for path in (str(ws / "fifo"), "/dev/null", str(ws / "d")):  # --force never replaces a non-regular file
        with pytest.raises(OutputError):
            output_file(path, force=True)


def test_output_file_never_an_input(ws: Path) -> None:
    inp = ws / "in.bin"
    for out, needle in ((inp, "is the input"), (ws / "hard.bin", "same file as the input"),
                        (ws / "soft.bin", "same file as the input"), (ws / "x" / ".." / "in.bin", "input")):
        with pytest.raises(OutputError, match=needle):
            output_file(str(out), inputs=[inp], force=True)
    with pytest.raises(OutputError, match="same file as the input"):  # the input given through its link
        output_file(str(inp), inputs=[ws / "soft.bin"], force=True)
    assert output_file(str(ws / "new.bin"), inputs=[inp, None, ws / "missing"]) == ws / "new.bin"
    assert output_file(str(ws / "user.txt"), inputs=[inp], force=True) == ws / "user.txt"


def test_directories_and_inputs_do_not_nest(ws: Path) -> None:
    with pytest.raises(OutputError, match="contains the input"):
        check_not_input(ws, [ws / "d" / "inner.bin"])
    with pytest.raises(OutputError, match="lies inside the input directory"):
        check_not_input(ws / "d" / "out", [ws / "d"])
    check_not_input(ws / "out", [ws / "d", ws / "in.bin"])  # siblings are fine


def test_output_dir_ownership(ws: Path) -> None:
    marker = lambda d: (d / "ours.json").is_file()  # noqa: E731
    assert output_dir(str(ws / "new")) == ws / "new"
    (ws / "empty").mkdir()
    assert output_dir(str(ws / "empty")) == ws / "empty"
    with pytest.raises(OutputError, match="already holds files tleg-deploy did not write, e.g. inner.bin"):
        output_dir(str(ws / "d"), ours=marker)
    assert output_dir(str(ws / "d"), ours=marker, force=True) == ws / "d"  # force: write into it, keep the rest
    for bad, needle in (("", "path is empty"), (str(ws / "user.txt"), "a regular file, but a directory"),
                        (str(ws / "fifo"), "a fifo")):
        with pytest.raises(OutputError, match=needle):
            output_dir(bad, force=True)
    (ws / "d" / "ours.json").write_text("{}")
    assert output_dir(str(ws / "d"), ours=marker) == ws / "d"
    owns = lambda rel, is_dir: rel == "ours.json"  # noqa: E731
    with pytest.raises(OutputError, match="inner.bin was not written by tleg-deploy"):  # whole: every file ours
        output_dir(str(ws / "d"), ours=marker, owns=owns, whole=True, force=True)
    with pytest.raises(OutputError):  # whole: force does not open a foreign directory either
        output_dir(str(ws), ours=marker, owns=owns, whole=True, force=True)


def test_first_foreign_walks_top_down_sorted(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.txt").write_text("")
    (tmp_path / "a" / "z.txt").write_text("")
    (tmp_path / "b").mkdir()
    assert first_foreign(tmp_path, lambda rel, is_dir: rel in ("a", "a/ok.txt")) == "b/"  # a level before deeper
    assert first_foreign(tmp_path, lambda rel, is_dir: rel in ("a", "b", "a/ok.txt")) == "a/z.txt"
    assert first_foreign(tmp_path, lambda rel, is_dir: True) is None


def test_move_files_into_keeps_a_users_file(tmp_path: Path) -> None:
    stage, final = tmp_path / ".stage", tmp_path / "final"
    stage.mkdir()
    final.mkdir()
    (stage / "model.onnx").write_text("new")
    (final / "model.onnx").write_text("old")
    (final / "model_fp16.onnx").write_text("old, no longer made")
    (final / "notes.txt").write_text("mine")
    placed = move_files_into(stage, final, ours=lambda n: n.startswith("model"))
    assert placed == ["model.onnx"] and not stage.exists()
    assert sorted(p.name for p in final.iterdir()) == ["model.onnx", "notes.txt"]
    assert (final / "model.onnx").read_text() == "new" and (final / "notes.txt").read_text() == "mine"
    stage.mkdir()
    (stage / "notes.txt").write_text("x")
    (final / "notes.txt").unlink()
    (final / "notes.txt").mkdir()
    with pytest.raises(OutputError, match="a directory, where tleg-deploy writes a file"):
        move_files_into(stage, final, ours=lambda n: True)


def test_staging_dir_honours_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        d = staging_dir(tmp_path / "out")
    finally:
        os.umask(old)
    assert d.parent == tmp_path and d.name.startswith(".out.")
    assert d.stat().st_mode & 0o777 == 0o750  # mkdtemp alone gives 0700


def test_input_file_and_plain_names(ws: Path) -> None:
    assert input_file(ws / "in.bin") == ws / "in.bin"
    with pytest.raises(FileNotFoundError, match="no such file"):
        input_file(ws / "missing")
    with pytest.raises(IsADirectoryError, match="is a directory, but a file is expected"):
        input_file(ws / "d")
    with pytest.raises(OutputError, match="a fifo"):
        input_file(ws / "fifo")
    for good in ("jetson", "jetson-orin-nano", "rtx_4090", "x86.box"):
        assert check_plain_name(good) == good
    for bad in ("../../x", "a/b", "..", ".hidden", "", "x/..", "a\\b"):
        with pytest.raises(OutputError, match="not a plain name"):
            check_plain_name(bad)


def test_atomic_path_refuses_non_regular_targets_and_names_the_target(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(OutputError, match="is a fifo"), fileio.atomic_path(tmp_path / "fifo") as tmp:
        tmp.write_text("x")
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        fileio.write_text_atomic(tmp_path / "dir", "x")

    def full_disk(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", src)

    monkeypatch.setattr(fileio.os, "replace", full_disk)
    with pytest.raises(OSError) as info:
        fileio.write_text_atomic(tmp_path / "out.txt", "x")
    assert info.value.filename == str(tmp_path / "out.txt") and info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]  # no temp file left behind


def test_atomic_write_gives_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        fileio.write_text_atomic(tmp_path / "a" / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "b.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_json_with_a_non_finite_number_is_never_written(tmp_path: Path, bad: float) -> None:
    from tleg_deploy.errors import NonFiniteError
    from tleg_deploy.files.fileio import write_json_atomic

    target = tmp_path / "plan.json"
    target.write_text('{"old": 1}\n')
    with pytest.raises(NonFiniteError, match="plan.json"):
        write_json_atomic(target, {"latency_ms": {"p50": bad}})
    assert target.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
