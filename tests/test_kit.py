"""Device kits for ONNX Runtime: the shipped runner imports nothing of ours and follows the profiler's
protocol; a kit runs with only python3 + onnxruntime + numpy and imports as a measured profile; every
bad result (missing, truncated, NaN, tampered, another kit's) is refused with nothing written."""

from __future__ import annotations

import ast
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.errors import FormatError, NonFiniteError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile import kit_runner
from tleg_deploy.profile.config import MeasureConfig
from tleg_deploy.profile.kit import KitConfig, build_kit
from tleg_deploy.profile.kit_import import _point, import_kit, kit_points, kit_readings
from tleg_deploy.profile.timing import time_runners

SPEC = ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=4)
FAST = dict(rounds=2, round_seconds=0.01, extra_rounds=0, retries=0, warmup=1)


def test_runner_imports_only_stdlib_numpy_and_onnxruntime() -> None:
    tree = ast.parse(Path(kit_runner.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) - {"__future__"} == {"numpy", "onnxruntime"}


def test_runner_follows_the_profilers_timing_protocol() -> None:
    """Same calls, same shuffles, same statistics as profile.timing for deterministic runners."""
    def runners() -> dict[int, object]:
        return {d: (lambda c=itertools.count(), d=d: 1.0 * d + (next(c) % 7) * 0.01) for d in (1, 3, 5)}  # type: ignore[misc]

    cfg = MeasureConfig(rounds=3, round_seconds=0.05, extra_rounds=2, settle_rel_se=1e-9, min_reps=3, max_reps=20)
    theirs = time_runners(runners(), cfg)  # type: ignore[arg-type]
    protocol = {k: getattr(cfg, k) for k in ("warmup", "rounds", "round_seconds", "min_reps", "max_reps",
                                             "extra_rounds", "settle_rel_se", "seed")}
    ours = kit_runner.time_rounds(runners(), protocol)
    for d, stats in theirs.items():
        point = _point(d, ours[d], 0.0)
        assert (point.p50_ms, point.p90_ms, point.p99_ms, point.n, point.rounds) == pytest.approx(
            (stats["p50"], stats["p90"], stats["p99"], stats["n"], stats["rounds"]))
        assert point.p50_se_ms == pytest.approx(stats["p50_se"]) and point.p90_se_ms == pytest.approx(stats["p90_se"])


@pytest.fixture(scope="module")
def ran_kit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished fp32 + int8 kit, run with this interpreter (it has onnxruntime and numpy)."""
    cfg = KitConfig("box", MeasureConfig(precisions=("fp32", "int8"), depths=(1, 2, 4), **FAST))  # type: ignore[arg-type]
    kit = build_kit(SPEC, cfg, tmp_path_factory.mktemp("kits") / "kit-box")
    proc = subprocess.run(["sh", str(kit / "run.sh")], env={**os.environ, "KIT_PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return kit


def test_kit_is_self_contained_and_imports_as_a_measured_profile(ran_kit: Path) -> None:
    kit = json.loads((ran_kit / "kit.json").read_text())
    assert set(kit["files"]) == {"run.sh", "kit_runner.py", *(a["file"] for a in kit["artifacts"])}
    assert (ran_kit.with_name("kit-box.tar.gz")).is_file()
    assert "tleg_deploy" not in (ran_kit / "run.sh").read_text()
    assert (ran_kit / "results" / "env" / "uname.txt").is_file()
    prof = import_kit(ran_kit)
    assert (prof.name, prof.source, prof.backend, prof.kind) == ("box", "measured", "onnxruntime", "cpu")
    assert [e.precision for e in prof.entries] == ["fp32", "int8"]
    for e in prof.entries:
        assert e.depths == (1, 2, 4) and all(p.n >= 6 and p.memory_mb > 0 for p in e.points)
        assert e.fit.latency_p50.slope > 0
    assert prof.environment["libraries"]["onnxruntime"]
    assert "uname.txt" in prof.environment["recorded"]


def _copy(ran_kit: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "kit"
    shutil.copytree(ran_kit, dst)
    return dst


def _edit_results(kit: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = kit / "results" / "onnxruntime.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


CASES = {
    "no results": (lambda k: shutil.rmtree(k / "results"), "has no results/"),
    "truncated": (lambda k: (k / "results" / "onnxruntime.json").write_text(
        (k / "results" / "onnxruntime.json").read_text()[:500]), "truncated"),
    "nan": (lambda k: _edit_results(k, lambda d: d["points"][0]["rounds"][0].__setitem__(0, float("nan"))), "nan"),
    "missing point": (lambda k: _edit_results(k, lambda d: d["points"].pop()), "no times for int8 depth 4"),
    "negative": (lambda k: _edit_results(k, lambda d: d["points"][1].__setitem__("memory_mb", -1.0)), "negative"),
    "tampered model": (lambda k: (k / "models" / "depth2.onnx").write_bytes(b"x"), "was changed"),
    "other kit": (lambda k: (k / "results" / "kit_id").write_text("0" * 32), "belongs to another kit"),
    "other kit's file": (lambda k: _edit_results(k, lambda d: d.__setitem__("kit_id", "1" * 32)), "another kit"),
    "missing model": (lambda k: (k / "models" / "depth1.int8.onnx").unlink(), "is missing"),
    "foreign point": (lambda k: _edit_results(k, lambda d: d["points"][0].__setitem__("depth", "x")),
                      "which this kit does not measure"),
    "repeated point": (lambda k: _edit_results(k, lambda d: d["points"].append(d["points"][0])), "repeats"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_results_are_refused_with_one_line_and_nothing_written(ran_kit: Path, tmp_path: Path, case: str) -> None:
    kit = _copy(ran_kit, tmp_path)
    spoil, message = CASES[case]
    spoil(kit)
    with pytest.raises((FormatError, NonFiniteError), match=f"(?i){message}"):
        import_kit(kit)
    out = tmp_path / "profiles" / "box.json"
    res = CliRunner().invoke(app, ["profile", "--from-kit", str(kit), "-o", str(out)])
    assert res.exit_code == 2 and "error" in res.output and not out.exists()
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) <= 3  # one message (rich may wrap it)


def test_cli_import_writes_the_profile(ran_kit: Path, tmp_path: Path) -> None:
    out = tmp_path / "box.json"
    res = CliRunner().invoke(app, ["profile", "--from-kit", str(ran_kit), "--device", "lab", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["device"]["name"] == "lab"


def test_run_sh_says_what_is_missing(ran_kit: Path, tmp_path: Path) -> None:
    kit = _copy(ran_kit, tmp_path)
    proc = subprocess.run(["sh", str(kit / "run.sh")], env={**os.environ, "KIT_PYTHON": "/nonexistent/python3"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3 and "missing: /nonexistent/python3" in proc.stderr
    bare = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    proc = subprocess.run(["sh", str(kit / "run.sh")], env={**os.environ, "KIT_PYTHON": str(bare / "bin" / "python")},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3 and "missing Python packages" in proc.stderr and "numpy onnxruntime" in proc.stderr
    assert (kit / "results").is_dir()  # the earlier complete results are untouched by a failed check


def test_existing_output_is_refused_without_force(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    cfg = KitConfig("box", MeasureConfig(depths=(1, 2), **FAST))  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="already exists"):
        build_kit(SPEC, cfg, tmp_path / "mine")
    with pytest.raises(FormatError, match="not a device kit"):
        build_kit(SPEC, cfg, tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_import_needs_no_torch(ran_kit: Path) -> None:
    code = ("import sys; from tleg_deploy.profile.kit_import import import_kit; "
            f"import_kit({str(ran_kit)!r}); sys.exit(1 if 'torch' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr or "importing a kit's results imported torch"


def test_force_never_replaces_a_tarball_or_link_that_is_not_this_kit(tmp_path: Path) -> None:
    cfg = KitConfig("box", MeasureConfig(depths=(1, 2), **FAST))  # type: ignore[arg-type]
    (tmp_path / "k.tar.gz").write_bytes(b"my own archive")
    with pytest.raises(FormatError, match="not this kit's archive"):
        build_kit(SPEC, cfg, tmp_path / "k", force=True)
    assert (tmp_path / "k.tar.gz").read_bytes() == b"my own archive" and not (tmp_path / "k").exists()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(FormatError, match="not a directory tleg-deploy wrote"):
        build_kit(SPEC, cfg, tmp_path / "link", force=True)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real").is_dir()
    kit = build_kit(SPEC, cfg, tmp_path / "k2")
    first = json.loads((kit / "kit.json").read_text())["kit_id"]
    build_kit(SPEC, cfg, tmp_path / "k2", force=True)  # our own kit and archive are replaced together
    second = json.loads((kit / "kit.json").read_text())["kit_id"]
    with tarfile.open(tmp_path / "k2.tar.gz") as tar:
        packed = json.loads(tar.extractfile("k2/kit.json").read())["kit_id"]  # type: ignore[union-attr]
    assert first != second == packed
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_kit_with_repeats_measures_each_depth_that_many_times(tmp_path: Path) -> None:
    """``repeats`` (what ``fit --kit`` asks for): the runner makes the whole measurement again, each a fresh
    session; the results hold one entry per depth and repeat (memory probed in the first only); the import pools
    them, and ``kit_readings`` gives them one by one (what ``fit --kit-results`` steps on). A repeat out of range
    or one missing is refused."""
    cfg = KitConfig("box", MeasureConfig(precisions=("fp32",), depths=(1, 2), **FAST), repeats=2)  # type: ignore[arg-type]
    kit = build_kit(SPEC, cfg, tmp_path / "kit-box")
    assert json.loads((kit / "kit.json").read_text())["protocol"]["repeats"] == 2
    proc = subprocess.run(["sh", str(kit / "run.sh")], env={**os.environ, "KIT_PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "(repeat 2 of 2)" in proc.stderr and proc.stderr.count("peak memory of depth") == 2
    points = json.loads((kit / "results" / "onnxruntime.json").read_text())["points"]
    assert sorted((p["depth"], p["repeat"], p["memory_mb"] is None) for p in points) == [
        (1, 0, False), (1, 1, True), (2, 0, False), (2, 1, True)]
    _kit, readings = kit_readings(kit)
    pooled = {d: p for (_prec, d), p in kit_points(kit)[1].items()}  # as the import pools them (no line: 2 tiny depths)
    for d in (1, 2):
        first, second = readings[("fp32", d)]
        assert first.p90_ms != second.p90_ms and first.memory_mb == second.memory_mb > 0
        assert pooled[d].n == first.n + second.n and pooled[d].rounds == first.rounds + second.rounds
    spoiled = _copy(kit, tmp_path / "a")
    _edit_results(spoiled, lambda d: d["points"][-1].__setitem__("repeat", 2))
    with pytest.raises(FormatError, match="is repeat 2; this kit makes 2"):
        import_kit(spoiled)
    spoiled = _copy(kit, tmp_path / "b")
    _edit_results(spoiled, lambda d: d["points"].pop())
    with pytest.raises(FormatError, match=r"no times for fp32 depth \d \(repeat 2 of 2\)"):
        import_kit(spoiled)


def test_kit_cli_repeats(tmp_path: Path) -> None:
    """``tleg-deploy kit --repeats N`` writes it into the protocol; out of range is one line, nothing written."""
    out = tmp_path / "kit-box"
    res = CliRunner().invoke(app, ["kit", "--device", "box", "--depths", "1,2", "--repeats", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "kit.json").read_text())["protocol"]["repeats"] == 3
    res = CliRunner().invoke(app, ["kit", "--device", "box", "--depths", "1,2", "--repeats", "0", "-o",
                                   str(tmp_path / "other")])
    assert res.exit_code == 2 and "repeats must be 1-20" in res.output and not (tmp_path / "other").exists()
    # a directory of the user's at -o: refused before any model is exported, left as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    for force in ([], ["--force"]):
        res = CliRunner().invoke(app, ["kit", "--device", "box", "--depths", "1,2", "-o", str(mine), *force])
        assert res.exit_code != 0 and "exporting" not in res.output, res.output
        assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"


def test_a_kit_alone_times_each_depth_in_its_own_session(tmp_path: Path) -> None:
    """``alone`` (``fit --ssh``'s search kits): each depth is timed in its own session, one after the other, as a
    deployment runs one model, not interleaved round by round with the others; the results read back as usual."""
    cfg = KitConfig("box", MeasureConfig(precisions=("fp32",), depths=(1, 2), memory=False, **FAST),  # type: ignore[arg-type]
                    alone=True)
    kit = build_kit(SPEC, cfg, tmp_path / "kit-box")
    assert json.loads((kit / "kit.json").read_text())["protocol"]["alone"] is True
    proc = subprocess.run(["sh", str(kit / "run.sh")], env={**os.environ, "KIT_PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("round 1 of") == 2  # one session per depth (interleaved: one for both)
    # read back as fit's search reads it (a line through two near-equal tiny depths may fall: not a profile)
    assert sorted(kit_points(kit)[1]) == [("fp32", 1), ("fp32", 2)]
