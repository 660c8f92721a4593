"""Nothing lost, nothing silently wrong: every command, fed a bad path or value, fails with exit code 2
and one ``error:`` line, and leaves every file where it was.

``CASES`` is the table: one line per case (command line as a shell string, run from a workspace of
fixture files; a needle the one error line must contain). Each case runs through the real entry
point (``tleg_deploy.cli.main``, in this process for speed; a few also as ``python -m tleg_deploy``)
and then the whole workspace, and the directory around it, must be byte-identical to before: no
input or user file changed, nothing new, no temp file left. ``-o /dev/null`` is refused by the
policy's unit test (test_output_policy.py): a regression here, run as root, would replace the
machine's /dev/null, so the CLI cases use a fifo of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from tleg_deploy.model.resources import learngene_path

# workspace layout (built once, copied per case); links and the fifo are made per case
USER_BYTES = b"a user's file: must survive byte for byte\n"
FILES: dict[str, bytes] = {
    "existing.safetensors": USER_BYTES, "text.txt": b"hello, not a tensor file\n", "empty.safetensors": b"",
    "ckpt.pth": b"not really a checkpoint", "data.npz": b"not really an npz", "dir/inner.txt": USER_BYTES,
    "userdir/notes.txt": USER_BYTES, "rep/report.md": b"# my own report\n", "demo-out/host/notes.txt": USER_BYTES,
    "fitdir/plan.json": b'{"format": "tleg-fit"}\n', "fitdir/mine.txt": USER_BYTES,
}

NO_FILE = "no such file"
DIR_IN = "is a directory, but a file is expected"
DIR_OUT = "but a directory is expected"
EXISTS = "already exists (pass --force to replace it)"
EMPTY = "path is empty"
FOREIGN = "already holds files tleg-deploy did not write"
NOT_ST = "not a readable safetensors file"
SAME = "is the same file as the input"

# (command line, needle in the one error line). Adding a case is adding a line.
CASES: list[tuple[str, str]] = [
    # expand: single-file output
    ("expand -d 2 -o ''", EMPTY),
    ("expand -d 2 -o newdir/", "names a directory, but a file is expected"),
    ("expand -d 2 -o .", "names a directory"),
    ("expand -d 2 -o existing.safetensors", EXISTS),
    ("expand -d 2 -o dir", "output dir is a directory, but a file is expected"),
    ("expand -d 2 -o dir --force", "output dir is a directory"),
    ("expand -d 2 -o fifo --force", "is a fifo (named pipe), not a regular file; it is never replaced"),
    ("expand -d 2 -o existing.safetensors/x.safetensors", "is a regular file, not a directory"),
    ("expand -d 2 -l lg.safetensors -o lg.safetensors --force", "is the input lg.safetensors"),
    ("expand -d 2 -l lg.safetensors -o lg_link.safetensors --force", SAME),
    ("expand -d 2 -l lg.safetensors -o lg_hard.safetensors --force", SAME),
    ("expand -d 2 -l missing.safetensors -o x.safetensors", NO_FILE),
    ("expand -d 2 -l dir -o x.safetensors", DIR_IN),
    ("expand -d 2 -l fifo -o x.safetensors", "not a regular file"),
    ("expand -d 2 -l empty.safetensors -o x.safetensors", NOT_ST),
    ("expand -d 2 -l text.txt -o x.safetensors", NOT_ST),
    ("expand -d 2 -l model.safetensors -o x.safetensors", "expected 'tleg-learngene'"),
    ("expand -d 0 -o x.safetensors", "--depth"),
    ("expand -d abc -o x.safetensors", "valid integer"),
    # extract / import-tleg: the input is the output
    ("extract model.safetensors --spec digits -o model.safetensors --force", "is the input"),
    ("extract model.safetensors --spec digits -o model_hard.safetensors --force", SAME),
    ("extract model.safetensors --spec digits -o model_link.safetensors --force", SAME),
    ("extract model_link.safetensors --spec digits -o model.safetensors --force", SAME),
    ("extract model.safetensors --spec digits -o existing.safetensors", EXISTS),
    ("extract model.safetensors --spec digits -o ''", EMPTY),
    ("extract model.safetensors --spec digits -o newdir/", "names a directory"),
    ("extract dir --spec digits -o x.safetensors", DIR_IN),
    ("extract missing.safetensors --spec digits -o x.safetensors", NO_FILE),
    ("extract empty.safetensors --spec digits -o x.safetensors", NOT_ST),
    ("extract text.txt --spec digits -o x.safetensors", NOT_ST),
    ("extract model.safetensors --spec nosuch -o x.safetensors", "nosuch"),
    ("import-tleg ckpt.pth -o ckpt.pth --force", "is the input"),
    ("import-tleg ckpt.pth -o existing.safetensors", EXISTS),
    ("import-tleg ckpt.pth -o fifo", "fifo"),
    ("import-tleg missing.pth -o x.safetensors", NO_FILE),
    ("import-tleg dir -o x.safetensors", DIR_IN),
    ("import-tleg text.txt -o x.safetensors", "text.txt"),
    ("import-tleg empty.safetensors -o x.safetensors", "empty.safetensors"),
    # info: inputs only
    ("info dir", DIR_IN),
    ("info missing.safetensors", NO_FILE),
    ("info text.txt", NOT_ST),
    ("info empty.safetensors", NOT_ST),
    # export / export-family: directory outputs
    ("export -d 2 -o userdir", f"{FOREIGN}, e.g. notes.txt"),
    ("export -d 2 -o rep", f"{FOREIGN}, e.g. report.md"),
    ("export -d 2 -o existing.safetensors", DIR_OUT),
    ("export -d 2 -o fifo --force", DIR_OUT),
    ("export -d 2 -o ''", EMPTY),
    ("export -d 2 -l lg.safetensors -o .", "contains the input"),
    ("export -d 0 -o out", "depth"),
    ("export -d 2 -l text.txt -o out", NOT_ST),
    ("export -d 2 --weights missing.safetensors -o out", NO_FILE),
    ("export -d 2 --weights dir -o out", DIR_IN),
    ("export -d 2 --format magic -o out", "unknown format 'magic'"),
    ("export-family --depths 1,,2 -o out", "an empty item"),
    ("export-family --depths 1, -o out", "an empty item"),
    ("export-family --depths 0 -o out", "depth"),
    ("export-family --depths 5-3 -o out", "bad depth range '5-3'"),
    ("export-family --depths abc -o out", "cannot read depths 'abc'"),
    ("export-family --depths '' -o out", "no depths"),
    ("export-family --depths 1-2 -o userdir", FOREIGN),
    ("export-family --depths 1-2 --device nosuch -o out", "nosuch"),
    ("export-family --depths 1-2 -l missing.safetensors -o out", NO_FILE),
    ("export-family --depths 1-2 --data npz:data.npz -o data.npz", "is the input data.npz"),
    # fit: a directory replaced as a whole
    ("fit --device jetson --latency 5parsecs", "unknown time unit 'parsecs'"),
    ("fit --device jetson --memory 12bananas -o out", "12bananas"),
    ("fit --device jetson --latency 5ms --percentile p42 -o out", "p42"),
    ("fit --device nosuch --latency 5ms -o out", "nosuch"),
    ("fit --device jetson --latency 5ms -o userdir", FOREIGN),
    ("fit --device jetson --latency 5ms -o fitdir", "fitdir/mine.txt was not written by tleg-deploy"),
    ("fit --device jetson --latency 5ms -o existing.safetensors", DIR_OUT),
    ("fit --device jetson --latency 5ms -o ''", EMPTY),
    ("fit --device jetson --latency 5ms -l lg.safetensors -o .", "contains the input"),
    ("fit --device jetson --latency 5ms -l dir -o out", DIR_IN),
    ("fit --device jetson --latency 5ms --finetune-data folder:dir -o dir/out", "lies inside the input directory"),
    # report
    ("report --device jetson -o rep", f"{FOREIGN}, e.g. report.md"),
    ("report --device jetson -o existing.safetensors", DIR_OUT),
    ("report --device jetson -o ''", EMPTY),
    ("report --device jetson --latency 5parsecs -o out", "unknown time unit"),
    ("report --device jetson --family userdir -o out", "no manifest.json"),
    ("report --device jetson --results missingdir -o out", "does not exist"),
    ("report --device jetson --results dir -o dir/out", "lies inside the input directory"),
    # profile: device names are plain names; -o is a profile file
    ("profile --device ../../x --depths 1,2", "'../../x' is not a plain name"),
    ("profile --device a/b --depths 1,2", "not a plain name"),
    ("profile --device .hidden --depths 1,2", "not a plain name"),
    ("profile --device box --depths 1,,2", "an empty item"),
    ("profile --device box --depths 0", "depth"),
    ("profile --device box --depths 5-3", "bad depth range"),
    ("profile --device box --depths abc", "cannot read depths"),
    ("profile --device box --depths 1,2 -o existing.safetensors", "is not a device profile"),
    ("profile --device box --depths 1,2 -o fifo", "fifo"),
    ("profile --device box --depths 1,2 -o dir", "is a directory"),
    ("profile --device box --depths 1,2 -o ''", EMPTY),
    # training: the output is checked before the training, not after
    ("train-teacher --epochs 1 -o existing.safetensors", EXISTS),
    ("train-teacher --epochs 1 -o dir", "is a directory"),
    ("train-teacher --epochs 1 -o newdir/", "names a directory"),
    ("train-teacher --epochs 1 --data npz:data.npz -o data.npz --force", "is the input"),
    ("train-learngene --teacher model.safetensors -o model.safetensors --force", "is the input"),
    ("train-learngene --teacher missing.safetensors -o x.safetensors", NO_FILE),
    ("finetune -d 2 -l lg.safetensors -o lg_hard.safetensors --force", SAME),
    ("finetune -d 2 -o ''", EMPTY),
    # demo: every option checked before the host half runs
    ("demo --jetson-latency 5parsecs -o d", "unknown time unit 'parsecs'"),
    ("demo -o existing.safetensors", DIR_OUT),
    ("demo -o demo-out", "demo-out/host"),
]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tleg_deploy.model.expansion import expand, save_descendant
    from tleg_deploy.model.resources import load_learngene

    root = tmp_path_factory.mktemp("template")
    for rel, data in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    shutil.copy(learngene_path("demo"), root / "lg.safetensors")
    lg = load_learngene("demo")
    save_descendant(expand(lg, 2), root / "model.safetensors", lg.sha256(), {"made_by": "test"})
    return root


@pytest.fixture
def ws(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh workspace two levels down (so ``../../x`` lands in ``tmp_path``); cwd is set to it."""
    root = tmp_path / "a" / "b" / "ws"
    shutil.copytree(template, root, symlinks=True)
    os.mkfifo(root / "fifo")
    for name in ("lg", "model"):
        (root / f"{name}_link.safetensors").symlink_to(f"{name}.safetensors")
        os.link(root / f"{name}.safetensors", root / f"{name}_hard.safetensors")
    monkeypatch.chdir(root)
    monkeypatch.delenv("TLEG_DEBUG", raising=False)
    monkeypatch.setenv("TLEG_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: a file's sha256, a link's target, or its kind."""
    seen: dict[str, str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                seen[rel] = "link -> " + os.readlink(p)
            elif p.is_file():
                seen[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                seen[rel] = "dir" if p.is_dir() else "special"
    return seen


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The real entry point, ``tleg_deploy.cli.main``, in this process."""
    from tleg_deploy.cli import main

    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["tleg-deploy", *args]):
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def check_one_error_line(code: int, out: str, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}\nstdout: {out}\nstderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err + out and "internal error" not in err and "[Errno" not in err, err
    assert ".tmp" not in err, err  # never our temporary names


@pytest.mark.parametrize("line, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_cleanly_and_loses_nothing(line: str, needle: str, ws: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    around = ws.parent.parent.parent  # tmp_path: catches a write that escapes the workspace
    before = snapshot(around)
    code, out, err = run_main(shlex.split(line), capsys)
    check_one_error_line(code, out, err, needle)
    assert out == "", out  # failed before doing any work
    assert snapshot(around) == before


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("line, needle", [
    ("extract model.safetensors --spec digits -o model_hard.safetensors --force", SAME),
    ("export-family --depths 1,,2 -o out", "an empty item"),
    ("expand -d abc -o x.safetensors", "valid integer"),
    ("profile --device ../../x --depths 1,2", "not a plain name"),
])
def test_as_a_subprocess(line: str, needle: str, ws: Path) -> None:
    before = snapshot(ws.parent.parent.parent)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("TLEG_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "tleg_deploy", *shlex.split(line)], capture_output=True,
                          text=True, env=env, timeout=120)
    check_one_error_line(proc.returncode, proc.stdout, proc.stderr, needle)
    assert snapshot(ws.parent.parent.parent) == before


# -- what works ----------------------------------------------------------------------------------------
def test_force_replaces_atomically(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(["expand", "-d", "2", "-o", "existing.safetensors", "--force"], capsys)
    assert code == 0, err
    assert (ws / "existing.safetensors").read_bytes() != USER_BYTES
    assert not list(ws.glob(".*.tmp")) and (ws / "existing.safetensors").stat().st_mode & 0o777 != 0o600


def test_export_rerun_keeps_the_users_files(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["export", "-d", "1", "-o", "ex", "-q", "--json"]
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    (ws / "ex" / "keep.txt").write_bytes(USER_BYTES)
    (ws / "ex" / "depth_01" / "notes.txt").write_bytes(USER_BYTES)
    (ws / "ex" / "depth_01" / "model.onnx").write_bytes(b"damaged")  # so the re-run rebuilds this member
    code, out, err = run_main(args, capsys)
    assert code == 0, err
    assert (ws / "ex" / "keep.txt").read_bytes() == USER_BYTES
    assert (ws / "ex" / "depth_01" / "notes.txt").read_bytes() == USER_BYTES
    assert (ws / "ex" / "depth_01" / "model.onnx").read_bytes() != b"damaged"
    manifest = json.loads((ws / "ex" / "manifest.json").read_text())
    assert sorted(manifest["members"]["1"]["files"]) == ["depth_01/model.onnx", "depth_01/model.validation.json"]
    # with --force, a foreign directory is written into, and its files are kept
    code, _, err = run_main(["export", "-d", "1", "-o", "userdir", "-q", "--force"], capsys)
    assert code == 0, err
    assert (ws / "userdir" / "notes.txt").read_bytes() == USER_BYTES and (ws / "userdir" / "manifest.json").is_file()


def test_report_rerun_replaces_only_its_own_files(ws: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["report", "--device", "jetson", "--results", "dir", "-o", "r", "-q", "--max-depth", "4"]
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    (ws / "r" / "notes.txt").write_bytes(USER_BYTES)
    code, _, err = run_main(args, capsys)
    assert code == 0, err
    assert (ws / "r" / "notes.txt").read_bytes() == USER_BYTES
    record = json.loads((ws / "r" / ".tleg-report.json").read_text())
    assert "report.md" in record["files"] and "notes.txt" not in record["files"]
    code, _, err = run_main(["report", "--device", "jetson", "--results", "dir", "-o", "rep", "-q", "--force",
                             "--max-depth", "4"], capsys)
    assert code == 0, err
    assert (ws / "rep" / "report.md").read_bytes() != FILES["rep/report.md"]  # --force replaced it


def test_json_output_is_valid_json_and_refuses_non_finite(capsys: pytest.CaptureFixture[str]) -> None:
    from tleg_deploy.cli.app import emit_json
    from tleg_deploy.errors import NonFiniteError

    emit_json({"ok": 1.5, "path": Path("x"), "nested": {"t": (0.25, 2)}})
    data = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON output"))
    assert data == {"ok": 1.5, "path": "x", "nested": {"t": [0.25, 2]}}
    for bad, where in (({"nan": float("nan")}, "output.nan"), ({"a": [1.0, float("inf")]}, r"output.a\[1\]"),
                       ({"n": {"t": (-float("inf"), 2)}}, r"output.n.t\[0\]")):
        with pytest.raises(NonFiniteError, match=where):
            emit_json(bad)
        assert capsys.readouterr().out == ""  # nothing printed, not even a partial document


@pytest.mark.parametrize("error, line", [
    (IsADirectoryError(21, "Is a directory", "m.safetensors"), "m.safetensors is a directory, but a file is expected"),
    (NotADirectoryError(20, "Not a directory", "f/x"), "f/x: a part of this path is not a directory"),
    (FileExistsError(17, "File exists", "out"), "out already exists"),
    (FileNotFoundError(2, "No such file or directory", "gone"), "no such file or directory: gone"),
    (PermissionError(13, "Permission denied", "ro/x"), "permission denied: ro/x"),
    (OSError(28, "No space left on device", "big.onnx"), "big.onnx: no space left on device"),
    (FileNotFoundError("no such file: lg.safetensors"), "no such file: lg.safetensors"),  # ours: kept as written
])
def test_system_errors_read_as_one_clear_line(error: OSError, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    from tleg_deploy.cli.app import _fail

    code = _fail(error).exit_code
    err = capsys.readouterr().err
    assert err.strip() == f"error: {line}" and code in (2, 3), err
