"""trtexec readers on fixtures of TensorRT 8.6 and 10.x (tests/data/trtexec/README.md says what they stand for)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tleg_deploy.errors import FormatError, NonFiniteError
from tleg_deploy.profile import trtexec

DATA = Path(__file__).parent / "data" / "trtexec"


@pytest.mark.parametrize(("name", "version", "memory_mib"), [("trt86", "8.6.1", 15.0), ("trt10", "10.3.0", 15.0)])
def test_fixtures_of_both_major_versions_parse(name: str, version: str, memory_mib: float) -> None:
    run = trtexec.read_run(DATA / f"{name}.times.json", DATA / f"{name}.log")
    assert run.version == version
    assert run.memory_mib == memory_mib
    assert len(run.times_ms) == 50  # the {"count": N} header is not an inference
    assert statistics.median(run.times_ms) == pytest.approx(run.median_ms, rel=1e-4)
    summary = trtexec.summary((DATA / f"{name}.log").read_text(), "Latency")
    assert set(summary) == {"min", "max", "mean", "median", "p90", "p95", "p99"}
    assert summary["min"] <= summary["median"] <= summary["p90"] <= summary["p99"] <= summary["max"]


def test_version_encodings() -> None:
    assert trtexec.version_from_log("&&&& RUNNING TensorRT.trtexec [TensorRT v8601] # trtexec") == "8.6.1"
    assert trtexec.version_from_log("[TensorRT v100200]") == "10.2.0"
    assert trtexec.version_from_log("[I] TensorRT version: 10.7.0") == "10.7.0"
    assert trtexec.version_from_log("no version here") is None


def test_end_minus_start_when_compute_ms_is_absent() -> None:
    text = json.dumps([{"startComputeMs": 1.0, "endComputeMs": 3.5}, {"startComputeMs": 4.0, "endComputeMs": 6.0}])
    assert trtexec.compute_times_ms(text) == [2.5, 2.0]


def _broken(tmp_path: Path, times: str | None = None, log: str | None = None) -> tuple[Path, Path]:
    t, lg = tmp_path / "x.times.json", tmp_path / "x.log"
    t.write_text((DATA / "trt10.times.json").read_text() if times is None else times)
    lg.write_text((DATA / "trt10.log").read_text() if log is None else log)
    return t, lg


def test_truncated_nan_missing_and_mixed_up_runs_are_refused(tmp_path: Path) -> None:
    full_times = (DATA / "trt10.times.json").read_text()
    full_log = (DATA / "trt10.log").read_text()
    with pytest.raises(FormatError, match="not complete JSON"):
        trtexec.read_run(*_broken(tmp_path, times=full_times[: len(full_times) // 2]))
    with pytest.raises(NonFiniteError):
        nan = full_times.replace('"computeMs" : 2.', '"computeMs" : NaN, "x" : 2.', 1)
        trtexec.read_run(*_broken(tmp_path, times=nan))
    with pytest.raises(FormatError, match="no 'GPU Compute Time' line"):
        trtexec.read_run(*_broken(tmp_path, log=full_log.split("=== Performance summary ===")[0]))
    with pytest.raises(FormatError, match="MemUsageChange"):
        trtexec.read_run(*_broken(tmp_path, log=full_log.replace("TensorRT-managed allocation", "allocation")))
    with pytest.raises(FormatError, match="does not belong"):
        trtexec.read_run(*_broken(tmp_path, log=full_log.replace("median = 2.", "median = 9.")))
    with pytest.raises(FormatError, match="holds no inference times"):
        trtexec.read_run(*_broken(tmp_path, times='[\n  {"count" : 0}\n]\n'))
    (tmp_path / "x.log").unlink()
    with pytest.raises(FormatError, match="missing"):
        trtexec.read_run(tmp_path / "x.times.json", tmp_path / "x.log")
