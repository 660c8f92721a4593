"""The export directory lock (filelock) and the strict manifest loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tleg_deploy.errors import ExportError
from tleg_deploy.export.manifest import LOCK_NAME, directory_lock

# Each worker takes the lock repeatedly (retrying when refused) and, while it holds it, claims a
# marker file exclusively: two holders at once would find the other's marker and fail.
_WORKER = """
import os, sys, time
from pathlib import Path
from tleg_deploy.errors import ExportError
from tleg_deploy.export.manifest import directory_lock

out, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
held = refused = 0
deadline = time.monotonic() + 60
while held < rounds and time.monotonic() < deadline:
    try:
        with directory_lock(out):
            fd = os.open(out / "holder", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError: both hold
            os.write(fd, me.encode())
            os.close(fd)
            time.sleep(0.002)
            os.unlink(out / "holder")
            held += 1
    except ExportError as e:
        assert "being written by another export" in e.message, e.message
        refused += 1
        time.sleep(0.001)
print(held, refused)
"""

_HOLDER = """
import sys
from pathlib import Path
from tleg_deploy.export.manifest import directory_lock

with directory_lock(Path(sys.argv[1])):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def test_contending_processes_never_both_hold_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    out.mkdir()
    # A leftover lock file of a dead process (the old format's JSON) blocks nobody: only the OS lock counts.
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999_999_999, "host": "x", "since": "x"}))
    rounds = 30
    workers = [subprocess.Popen([sys.executable, "-c", _WORKER, str(out), str(i), str(rounds)], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [w.communicate(timeout=120) for w in workers]
    for w, (stdout, stderr) in zip(workers, results, strict=True):
        assert w.returncode == 0, stderr[-2000:]
        held, _ = map(int, stdout.split())
        assert held == rounds
    assert sum(int(stdout.split()[1]) for stdout, _ in results) > 0  # they really contended
    assert not (out / "holder").exists()


def test_second_holder_is_refused_until_the_first_exits(tmp_path: Path) -> None:
    out = tmp_path / "fam"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], env=_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(ExportError, match="being written by another export"), directory_lock(out):
            pass
    finally:
        holder.kill()  # no clean release: the kernel drops the lock of a killed process
        holder.wait()
    with directory_lock(out) as path:
        assert path == out / LOCK_NAME


@pytest.fixture
def family(tiny_lg, tmp_path: Path) -> Path:
    from tleg_deploy.export.family import export_family

    out = tmp_path / "fam"
    export_family(tiny_lg, [1], out, "onnx", data=None)
    return out


def _first_rel(m: dict) -> str:
    return next(iter(m["members"]["1"]["files"]))


@pytest.mark.parametrize(("edit", "names"), [
    (lambda m: m["members"]["1"]["files"].update({"../../etc/passwd": "0" * 64}), "../../etc/passwd"),
    (lambda m: m["artifacts"][0].update(file="/etc/passwd"), "artifacts[0].file"),
    (lambda m: m["members"]["1"].update(dir="depth_01/../.."), "members.1.dir"),
    (lambda m: m.update(extra=1), "unexpected key 'extra'"),
    (lambda m: m["members"]["1"].update(note="x"), "unexpected key 'note'"),
    (lambda m: m["artifacts"][0].update(bytes=float("nan")), "artifacts[0].bytes"),
    (lambda m: m["artifacts"][0]["parity"].update(max_abs_diff=float("inf")), "parity.max_abs_diff"),
    (lambda m: m["artifacts"][0].update(sha256="abc"), "artifacts[0].sha256"),
    (lambda m: m["members"]["1"]["files"].update({_first_rel(m): "f" * 63}), "members.1.files"),
    (lambda m: m["artifacts"][0].update(precision="fp64"), "artifacts[0].precision"),
    (lambda m: m["learngene"].update(sha256=None), "learngene.sha256"),
])
def test_manifest_fields_are_checked(family: Path, edit, names: str) -> None:
    from tleg_deploy.export.manifest import load_manifest

    m = json.loads((family / "manifest.json").read_text())
    edit(m)
    (family / "manifest.json").write_text(json.dumps(m))  # json writes NaN / Infinity, and json.loads reads them
    with pytest.raises(ExportError, match="manifest.json is corrupted") as e:
        load_manifest(family)
    assert names in e.value.message


def test_written_manifest_loads_and_newer_version_is_named(family: Path) -> None:
    from tleg_deploy.export.manifest import load_manifest

    m = load_manifest(family)
    assert m is not None and list(m["members"]) == ["1"]
    m["schema_version"] = "2"
    (family / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="schema_version '2', expected '1'"):
        load_manifest(family)
