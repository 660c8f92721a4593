from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tleg_deploy.errors import DepthError, ExportError, OutputError
from tleg_deploy.export.family import export_family, parse_depths, parse_formats
from tleg_deploy.export.manifest import LOCK_NAME, load_manifest, member_is_intact
from tleg_deploy.files.fileio import sha256_file
from tleg_deploy.model.expansion import expand


def _claims_are_intact(out):
    manifest = load_manifest(out)
    for member in manifest["members"].values():
        assert member_is_intact(out, member)
    for a in manifest["artifacts"]:
        assert sha256_file(out / a["file"]) == a["sha256"] and (out / a["file"]).stat().st_size == a["bytes"]
    return manifest


def test_parse_depths_and_formats():
    assert parse_depths("1-12") == list(range(1, 13))
    assert parse_depths("2,4,8") == [2, 4, 8]
    assert parse_depths("1-24:2") == list(range(1, 25, 2))
    assert parse_depths("1-3, 8,2") == [1, 2, 3, 8]
    for bad in ("", "a-3", "5-2", "1-4:0", "0-3", "1-5000"):
        with pytest.raises(DepthError):
            parse_depths(bad)
    assert parse_formats("int8,onnx") == ("onnx", "int8")
    assert parse_formats(["fp16"]) == ("onnx", "fp16")  # fp32 ONNX is the base of every variant
    with pytest.raises(ExportError, match="unknown format 'magic'"):
        parse_formats("onnx,magic")


def test_family_manifest(tiny_lg, tmp_path):
    out = tmp_path / "fam"
    manifest = export_family(tiny_lg, [1, 3], out, "onnx", data=None)
    # no temp; the lock file stays (filelock keeps the inode so waiters share it), unlocked
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "depth_01", "depth_03", "labels.json", "manifest.json"]
    m = _claims_are_intact(out)
    assert m == json.loads((out / "manifest.json").read_text()) == manifest
    assert m["learngene"]["sha256"] == tiny_lg.sha256() and m["spec"] == tiny_lg.spec.to_dict()
    from tleg_deploy.plan import costs

    for a in m["artifacts"]:
        assert a["precision"] == "fp32" and a["params"] == costs.params(tiny_lg.spec, a["depth"])
        assert a["macs"] == costs.macs(tiny_lg.spec, a["depth"]) and 0 <= a["parity"]["max_abs_diff"] < 1e-4
        assert (out / a["file"]).with_name("model.validation.json").exists()
    s = m["storage"]
    assert s["learngene_params"] == tiny_lg.num_params() and s["members"] == 2
    assert s["family_params"] == costs.params(tiny_lg.spec, 1) + costs.params(tiny_lg.spec, 3)


def test_resume_after_interrupted_family_export(tiny_lg, tmp_path):
    out = tmp_path / "fam"
    export_family(tiny_lg, [1, 2], out, "onnx", data=None)
    # Ctrl-C in the middle of member 3: its ONNX file is written, validation is running.
    model3 = expand(tiny_lg, 3).eval()

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    handle = model3.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_family(tiny_lg, [1, 2, 3], out, "onnx", data=None, models={3: model3})
    handle.remove()
    m = _claims_are_intact(out)
    assert sorted(m["members"]) == ["1", "2"]
    names = sorted(p.name for p in out.iterdir())
    assert names == [LOCK_NAME, "depth_01", "depth_02", "labels.json", "manifest.json"]  # no temp
    # A crash can also leave a staging dir, and a file can rot: the re-run cleans up and redoes what is needed.
    (out / ".depth_03.partial").mkdir()
    (out / ".depth_03.partial" / "model.onnx").write_bytes(b"half")
    with open(out / "depth_02" / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    before = sha256_file(out / "depth_01" / "model.onnx"), (out / "depth_01" / "model.onnx").stat().st_mtime_ns
    messages = []
    export_family(tiny_lg, [1, 2, 3], out, "onnx", data=None, progress=lambda text, done, total: messages.append(text))
    assert messages[0] == "1 of 3 members already exported"  # depth 1 skipped; 2 (corrupted) and 3 redone
    first = out / "depth_01" / "model.onnx"
    assert (sha256_file(first), first.stat().st_mtime_ns) == before
    m = _claims_are_intact(out)
    assert sorted(m["members"]) == ["1", "2", "3"] and not (out / ".depth_03.partial").exists()
    assert sorted(a["depth"] for a in m["artifacts"]) == [1, 2, 3]


def test_lock_blocks_a_second_run_and_is_freed_when_its_holder_dies(tiny_lg, tmp_path):
    out = tmp_path / "fam"
    out.mkdir()
    # A live process holds the lock: a clear error, and the directory is untouched.
    script = ("import sys; from pathlib import Path; from tleg_deploy.export.manifest import directory_lock\n"
              "with directory_lock(Path(sys.argv[1])):\n    print('holding', flush=True); sys.stdin.readline()")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    holder = subprocess.Popen([sys.executable, "-c", script, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ExportError, match="being written by another export"):
            export_family(tiny_lg, [1], out, "onnx", data=None)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (killed, no clean exit): the kernel released its lock and the next run proceeds.
    export_family(tiny_lg, [1], out, "onnx", data=None)
    assert load_manifest(out)["members"].keys() == {"1"}


def test_bad_manifest_and_other_learngene_are_errors(tiny_lg, tmp_path):
    out = tmp_path / "fam"
    export_family(tiny_lg, [1], out, "onnx", data=None)
    files = sorted(p.name for p in out.rglob("*"))
    other = type(tiny_lg).init(tiny_lg.spec, aux_depth=4, seed=7)
    with pytest.raises(ExportError, match="another learngene"):
        export_family(other, [2], out, "onnx", data=None)
    (out / "manifest.json").write_text('{"format": "tleg-export-manifest", "schema_ver')
    with pytest.raises(ExportError, match="corrupted"):
        export_family(tiny_lg, [2], out, "onnx", data=None)
    assert sorted(p.name for p in out.rglob("*")) == files  # nothing new


def test_not_a_directory_and_unwritable(tiny_lg, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="but a directory is expected"):
        export_family(tiny_lg, [1], blocker, "onnx", data=None)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:  # root ignores the mode (as in CI): answer what the kernel answers anyone else

        def denied(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(type(ro), "mkdir", denied)
    try:
        with pytest.raises(ExportError, match="permission denied"):
            export_family(tiny_lg, [1], ro / "out", "onnx", data=None)
    finally:
        ro.chmod(0o700)


def test_family_variants_and_build_script(tiny_lg, tmp_path):
    images = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    np_path = tmp_path / "imgs.npz"
    import numpy as np

    x = (images.permute(0, 2, 3, 1).numpy() * 40 + 128).clip(0, 255).astype(np.uint8)  # (N, H, W, C)
    np.savez(np_path, x=np.concatenate([x] * 4), y=np.arange(256) % 5)
    out = tmp_path / "fam"
    m = export_family(tiny_lg, [2], out, "onnx,fp16,tensorrt", data=f"npz:{np_path}")
    precisions = {a["precision"] for a in m["artifacts"]}
    assert {"fp32", "fp16", "int8-qdq"} <= precisions
    script = (out / "depth_02" / "build_engine.sh").read_text()
    assert "--timingCacheFile=../timing.cache" in script and "model_int8_qdq.onnx" in script
    _claims_are_intact(out)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("members"),
    lambda m: m.update(schema_version="99"),
    lambda m: m["artifacts"].append({"depth": 1}),
    lambda m: m.update(learngene="x"),
])
def test_structurally_corrupted_manifest(tiny_lg, tmp_path, edit):
    out = tmp_path / "fam"
    export_family(tiny_lg, [1], out, "onnx", data=None)
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ExportError, match="manifest.json"):
        export_family(tiny_lg, [1, 2], out, "onnx", data=None)
    assert not (out / "depth_02").exists()


def test_members_built_in_parallel_are_the_same_files_committed_in_order(tiny_lg, tmp_path):
    """workers=3: after the proving member, members are built and validated in threads; the directory and the
    manifest are what one worker writes (same files, same bytes, same order)."""
    one = export_family(tiny_lg, range(1, 8), tmp_path / "one", "onnx", data=None, workers=1)
    many = export_family(tiny_lg, range(1, 8), tmp_path / "many", "onnx", data=None, workers=3)
    assert [a["sha256"] for a in many["artifacts"]] == [a["sha256"] for a in one["artifacts"]]
    assert [sorted(m["files"]) for m in many["members"].values()] == [
        sorted(m["files"]) for m in one["members"].values()]
    onnx = [{k: v for k, v in m["files"].items() if k.endswith(".onnx")} for m in one["members"].values()]
    assert [{k: v for k, v in m["files"].items() if k.endswith(".onnx")} for m in many["members"].values()] == onnx
    assert [a["parity"]["mode"] for a in many["artifacts"]] == [a["parity"]["mode"] for a in one["artifacts"]]
    with pytest.raises(ExportError, match="workers"):
        export_family(tiny_lg, [1], tmp_path / "zero", "onnx", data=None, workers=0)


def test_ctrl_c_while_members_build_in_parallel_leaves_only_committed_members(tiny_lg, tmp_path):
    """Ctrl-C in member 5 while 1-6 build in parallel: the prover (depth 2) and whichever members finished
    before the interrupt reached the parent are committed (member 6 may be one of them: it builds beside 5),
    the others are cancelled or removed (no staging directory, no directory without its claim in the
    manifest), and a re-run completes the family."""
    out = tmp_path / "fam"
    model5 = expand(tiny_lg, 5).eval()
    model5.register_forward_hook(lambda module, args, output: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_family(tiny_lg, range(1, 7), out, "onnx", data=None, models={5: model5}, workers=2)
    m = _claims_are_intact(out)
    assert "2" in m["members"] and "5" not in m["members"]
    assert not list(out.glob(".depth_*")) and not (out / "depth_05").exists()
    assert sorted(p.name for p in out.glob("depth_*")) == [f"depth_{int(d):02d}" for d in sorted(m["members"], key=int)]
    export_family(tiny_lg, range(1, 7), out, "onnx", data=None, workers=2)
    assert sorted(_claims_are_intact(out)["members"], key=int) == ["1", "2", "3", "4", "5", "6"]


def test_no_member_is_committed_when_the_prover_fails(tiny_lg, tmp_path):
    """The members built beside the prover cite its validation: when it fails they are thrown away too."""
    out = tmp_path / "fam"
    model2 = expand(tiny_lg, 2).eval()
    model2.register_forward_hook(lambda module, args, output: output + 1.0)  # PyTorch no longer matches the file
    with pytest.raises(ExportError, match="depth_02|model.onnx failed validation"):
        export_family(tiny_lg, range(1, 7), out, "onnx", data=None, models={2: model2}, workers=2)
    assert not out.exists() or not [p for p in out.iterdir() if p.name.startswith(("depth_", ".depth_"))]
    assert not (out / "manifest.json").exists() or not json.loads((out / "manifest.json").read_text())["members"]


def test_members_are_built_in_worker_processes_and_in_threads_where_fork_is_missing(tiny_lg, tmp_path, monkeypatch):
    """Members after the prover are built by forked workers (a member's forward runs in another process); on a
    platform without fork, by threads in this process; the files are the same either way."""
    import multiprocessing

    def family(out):
        pid_file = out.with_suffix(".pid")
        model3 = expand(tiny_lg, 3).eval()

        def note_pid(module, args, output):
            pid_file.write_text(str(os.getpid()))  # returns None: the output stays as it is

        model3.register_forward_hook(note_pid)
        m = export_family(tiny_lg, range(1, 5), out, "onnx", data=None, models={3: model3}, workers=2)
        return int(pid_file.read_text()), [a["sha256"] for a in m["artifacts"] if a["file"].endswith(".onnx")]

    can_fork = "fork" in multiprocessing.get_all_start_methods()
    if can_fork:
        pid, forked = family(tmp_path / "forked")
        assert pid != os.getpid()
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    pid, threaded = family(tmp_path / "threaded")
    assert pid == os.getpid()
    if can_fork:
        assert threaded == forked


def test_export_errors_keep_their_hint_across_processes():
    import pickle

    e = pickle.loads(pickle.dumps(ExportError("bad member", hint="do this")))
    assert isinstance(e, ExportError) and e.message == "bad member" and e.hint == "do this"


def test_members_exported_one_by_one_never_run_in_threads(tiny_lg, tmp_path):
    """Without the template every member calls torch.onnx.export, which keeps global state: one at a time."""
    m = export_family(tiny_lg, range(1, 5), tmp_path / "naive", "onnx", data=None, use_template=False, workers=4)
    assert sorted(m["members"], key=int) == ["1", "2", "3", "4"]
