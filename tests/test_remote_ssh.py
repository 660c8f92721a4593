"""``profile --ssh`` end to end through a real OpenSSH server that this test starts on 127.0.0.1 (a high
port, a throw-away host key, client key and config; only the loopback address is contacted). The
"target" is this machine, so the kit's runner is pointed at this interpreter (``--remote-python``),
which has onnxruntime and numpy. Skipped only where openssh-server is not installed (``make sshd``)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tleg_deploy.errors import FormatError
from tleg_deploy.model.resources import load_learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile.config import MeasureConfig
from tleg_deploy.profile.kit import KitConfig, build_kit
from tleg_deploy.profile.remote import RemoteKit, SshClient, SshTarget
from tleg_deploy.profile.table import DeviceProfile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _sshd import SSHD, free_port, loopback_sshd  # type: ignore[import-not-found]  # noqa: E402


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(target user@127.0.0.1:port, ssh config file) of a private sshd (``benchmarks/_sshd.py``)."""
    if not SSHD.exists():
        pytest.skip("openssh-server is not installed (make sshd installs it)")
    with loopback_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def _host_profile() -> DeviceProfile:
    """This machine's profile of the demo learngene's model (fp32, depths 1, 6, 12), measured in process now
    on the timing thread's CPU clock: the tests run beside another pytest worker, and a wall-clock line
    measured while it starts a process can bend enough to widen the 95% interval past every budget. One session
    (retries=0): the line's values at the measured depths are compared, and on a CPU where this small model's
    curve is off a line (an Intel Xeon here: every session) a re-measure only repeats it."""
    from tleg_deploy.profile.measure import profile

    return profile(ViTSpec.preset("digits"), config=MeasureConfig(depths=(1, 6, 12), memory=False, clock="thread",
                                                                  retries=0, gemm=False),
                   learngene=load_learngene("demo"))


def _line(prof) -> dict[int, float]:  # type: ignore[no-untyped-def]
    """The fitted p50 at each measured depth: the line uses all three points, so one disturbed point moves it less."""
    fit = prof.entries[0].fit.latency_p50
    return {d: fit.value(d) for d in prof.entries[0].depths}


def _ssh_p50(target: str, config: Path, out: Path) -> dict[int, float]:
    from tleg_deploy.cli.kit import kit_profile

    prof, written = kit_profile(device="loop", backend="onnxruntime", precision=None, depths="1,6,12", batch=1,
                                threads=1, spec="digits", from_kit=None, ssh=target, ssh_config=config,
                                remote_python=sys.executable, output=out, quiet=True, memory=False, clock="thread")
    assert written == out and out.is_file() and prof.source == "measured" and prof.name == "loop"
    return _line(prof)


@pytest.mark.slow
def test_ssh_profile_agrees_with_an_in_process_host_profile(sshd: tuple[str, Path], host_digits: DeviceProfile,
                                                           tmp_path: Path) -> None:
    """Both time the timing thread's CPU time (``clock="thread"``, the profiler's own option for a shared
    machine): wall-clock medians of the same model on this 2-core machine shared with other jobs moved by
    up to 2x between back-to-back runs, local or over SSH alike."""
    target, config = sshd
    host, remote = [_line(host_digits)], []  # the module's host profile: the same model, depths and protocol
    # Issue 10's gate: +-15% per depth. On this shared 2-core VM one pair can disagree by up to 2x (other jobs,
    # seconds apart), so profiles are added, interleaved, while the medians disagree: at most 5 of each.

    def ratios() -> dict[int, float]:
        return {d: statistics.median(r[d] for r in remote) / statistics.median(h[d] for h in host) for d in host[0]}

    def agree() -> bool:
        return all(0.85 <= r <= 1.15 for r in ratios().values())

    for i in range(5):  # interleaved (host, ssh, host, ssh, ...)
        remote.append(_ssh_p50(target, config, tmp_path / f"loop{i}.json"))
        if agree():
            break
        host.append(_line(_host_profile()))
        if agree():
            break
    assert agree(), (ratios(), remote, host)
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("tleg-kit.*/kit-loop"))  # remote dir removed
    assert not _ssh_masters()


def _ssh_masters() -> list[str]:
    """Command lines of SshClient master connections still running (each kit run closes its own)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [ln for ln in ps.splitlines() if ln.startswith("ssh ") and "ControlPath=" in ln and "tleg-ssh." in ln]


def test_ctrl_c_stops_the_remote_run_and_leaves_nothing(sshd: tuple[str, Path], tmp_path: Path) -> None:
    target, config = sshd
    cfg = KitConfig("loop", MeasureConfig(depths=(1, 2), rounds=50, round_seconds=0.05))
    kit = build_kit(ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0,
                            num_classes=4), cfg,
                    tmp_path / "kit-loop")
    seen: list[str] = []

    def progress(line: str) -> None:
        seen.append(line)
        if "round 1 " in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), SshClient(SshTarget.parse(target), config) as client, \
            RemoteKit(client, kit, sys.executable, progress) as on_target:
        on_target.run()
    workdir = next(m.group(1) for line in seen if (m := re.search(r":(/\S+tleg-kit\.\w+)", line)))
    assert not Path(workdir).exists()  # the remote working directory is gone
    assert not (kit / "results").exists() and not list(kit.glob(".results.*"))
    deadline = time.monotonic() + 1.0  # the runner, left alone, would time 50 rounds (5 s and more)
    while (running := [p for p in Path("/proc").iterdir() if p.name.isdigit() and workdir.encode() in _cmdline(p)]) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running, "the remote runner still runs"
    assert not _ssh_masters()  # the shared connection is closed on Ctrl-C too


def test_a_kit_on_the_target_runs_again_as_a_fresh_session(sshd: tuple[str, Path], tmp_path: Path) -> None:
    """``fit --ssh`` times a depth afresh by running its kit again where it is (``remote.kit_on_target``): one copy,
    then each run a new session whose complete results replace the local ones. Ctrl-C in a later run stops it and
    leaves the previous run's results; the remote working directory is removed when the block ends."""
    from tleg_deploy.profile.kit_import import kit_points
    from tleg_deploy.profile.remote import SshRun, kit_on_target

    target, config = sshd
    spec = ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=4)
    cfg = KitConfig("loop", MeasureConfig(depths=(1, 2), rounds=3, round_seconds=0.02, memory=False, retries=0))
    said: list[str] = []
    stop = [False]

    def progress(line: str) -> None:
        said.append(line)
        if stop[0] and "round 1 " in line:
            raise KeyboardInterrupt

    readings: list[float] = []
    with pytest.raises(KeyboardInterrupt), \
            kit_on_target(spec, cfg, SshRun(SshTarget.parse(target), config, sys.executable), progress=progress) as kit:
        workdir = next(m.group(1) for line in said if (m := re.search(r":(/\S+tleg-kit\.\w+)", line)))
        local = kit.kit_dir
        for _ in range(3):
            kit.run()
            _kit, points = kit_points(kit.kit_dir)
            assert sorted(points) == [("fp32", 1), ("fp32", 2)]
            readings.append(points[("fp32", 2)].p90_ms)
            assert Path(workdir).is_dir() and not list(kit.kit_dir.glob(".results.*"))
        assert len(set(readings)) == 3  # three sessions' own timings, not one replayed
        assert sum("copying" in line for line in said) == 1 and sum("done: results/" in line for line in said) == 3
        stop[0] = True
        try:
            kit.run()
        finally:  # the interrupted run left the last complete results as they were
            assert kit_points(kit.kit_dir)[1][("fp32", 2)].p90_ms == readings[-1]
    assert not Path(workdir).exists() and not local.exists()


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def test_targets_are_read_strictly() -> None:
    assert SshTarget.parse("pi@raspberry:2222") == SshTarget("pi@raspberry", 2222)
    assert SshTarget.parse("orin") == SshTarget("orin")
    for bad in ("", "-oProxyCommand=x", "a@b:port", "a@b:0", "a b"):
        with pytest.raises(FormatError):
            SshTarget.parse(bad)


@pytest.fixture(scope="module")
def host_digits() -> DeviceProfile:
    return _host_profile()


def _device_profile(prof: DeviceProfile, tmp_path: Path, scale: float) -> Path:
    """A measured profile of "loop" (another host, as far as fit knows) with ``prof``'s latencies x ``scale``."""
    import dataclasses

    from tleg_deploy.profile.table import make_entry

    e = prof.entries[0]
    keys = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "p50_se_ms", "p90_se_ms")
    points = [dataclasses.replace(p, **{k: getattr(p, k) * scale for k in keys}) for p in e.points]
    loop = dataclasses.replace(prof, name="loop", aliases=(), host_fingerprint="another-host", probe=None,
                               entries=(make_entry(e.spec, e.precision, 1, points),))
    return loop.save(tmp_path / f"loop-{scale}.json")


@pytest.mark.slow
def test_fit_over_ssh_steps_down_and_up_on_the_device(sshd: tuple[str, Path], host_digits: DeviceProfile,
                                                      tmp_path: Path) -> None:
    """``fit --ssh``: the pick and each step are measured on the target by device kits run over SSH. A profile
    that says the device is faster than it is (x0.4) makes fit step down; one that says it is slower (x2), up
    (factors beyond this shared machine's drift for a sub-millisecond model, up to 1.5x within a minute). The
    budget lies between depths 8 and 9 as this machine measured them, so that depth 1 of the x2 profile fits
    even with its interval's upper end."""
    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app
    from tleg_deploy.deploy.fit import fit
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.plan.solve import Budget
    from tleg_deploy.profile.remote import SshRun

    target, config = sshd
    spec = ViTSpec.preset("digits")
    line = {d: host_digits.predict(d, spec=spec, precision="fp32").latency_p90_ms for d in (8, 9)}
    budget = Budget(latency_ms=(line[8] + line[9]) / 2)
    run = SshRun(SshTarget.parse(target), config, sys.executable)
    down = fit(FitRequest(budget, device=str(_device_profile(host_digits, tmp_path, 0.4)), out_dir=tmp_path / "down",
                          ssh=run, max_steps=6, search=SearchOptions(max_depth=16, precisions=("fp32",))))
    assert down.depth < down.plan.depth and down.figures == "measured" and down.ssh == target
    assert "stepped to depth" in down.steps[0] and all(int(k) > down.depth for k in down.over_budget)
    assert down.measured is not None and down.measured.p90_ms <= budget.latency_ms
    assert any("device kits run over SSH" in n for n in down.notes)

    out = tmp_path / "up"
    logins = _logins(config)
    res = CliRunner().invoke(app, ["fit", "--device", str(_device_profile(host_digits, tmp_path, 2.0)), "--latency",
                                   f"{budget.latency_ms:.4f}ms", "--precision", "fp32", "--max-depth", "16", "--ssh",
                                   target, "--ssh-config", str(config), "--remote-python", sys.executable, "-o",
                                   str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "plan.json").read_text())
    assert doc["depth"] > doc["plan"]["depth"] and doc["figures"] == "measured" and doc["ssh"] == target
    assert any("stepped up to depth" in s for s in doc["steps"]) and f"on the device at {target}" in res.output
    assert doc["measured"]["p90_ms"] <= budget.latency_ms
    assert "stepped up to depth" in (out / "REPORT.md").read_text()
    # every kit of the fit went over one authenticated connection, closed at the end
    assert res.output.count("copying kit-") >= 2 and _logins(config) == logins + 1, res.output
    # a depth timed afresh (the pick read within 15% under the budget) is a new run of its kit, not a new copy
    assert res.output.count("copying kit-") == res.output.count("making the onnxruntime kit")
    assert res.output.count(f"connecting to {target}") == 1  # said once, before the one connection
    assert not _ssh_masters()


@pytest.mark.slow
def test_ctrl_c_in_fit_over_ssh_leaves_nothing_on_either_side(sshd: tuple[str, Path], host_digits: DeviceProfile,
                                                              tmp_path: Path) -> None:
    """Ctrl-C while ``fit --ssh`` times its second kit: the remote run stops, every kit the search left on the
    target is removed (the first one too), and locally neither the output nor a staging directory remains."""
    from tleg_deploy.deploy.fit import fit
    from tleg_deploy.deploy.fit_types import FitRequest, SearchOptions
    from tleg_deploy.plan.solve import Budget
    from tleg_deploy.profile.remote import SshRun

    target, config = sshd
    spec = ViTSpec.preset("digits")
    line = {d: host_digits.predict(d, spec=spec, precision="fp32").latency_p90_ms for d in (8, 9)}
    out = tmp_path / "out"
    said: list[str] = []

    def log(line: str) -> None:
        said.append(line)
        if sum("copying kit-" in s for s in said) == 2 and "round 1 " in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(FitRequest(Budget(latency_ms=(line[8] + line[9]) / 2), device=str(_device_profile(host_digits, tmp_path,
                                                                                                0.4)),
                       out_dir=out, ssh=SshRun(SshTarget.parse(target), config, sys.executable), max_steps=6,
                       search=SearchOptions(max_depth=16, precisions=("fp32",))), log=log)
    workdirs = [m.group(1) for s in said if (m := re.search(r":(/\S+tleg-kit\.\w+)", s))]
    assert len(workdirs) == 2 and not any(Path(w).exists() for w in workdirs)
    assert [p.name for p in tmp_path.iterdir()] == ["loop-0.4.json"]  # no output, no staging directory
    assert not _ssh_masters()


def _logins(config: Path) -> int:
    """Connections the test's sshd has authenticated so far (its log lies beside the client config)."""
    return (config.parent / "sshd.log").read_text().count("Accepted publickey")


@pytest.mark.slow
def test_fit_over_ssh_profiles_a_new_device_there_first(sshd: tuple[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``fit --device NEW --ssh``: a device without a profile is profiled over SSH first (a kit of depths 1, 6,
    12 at the precision asked for), solved on, and the pick measured there; nothing is written to ./profiles."""
    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app

    target, config = sshd
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "fit-newbox"
    res = CliRunner().invoke(app, ["fit", "--device", "newbox", "--latency", "5ms", "--precision", "fp32",
                                   "--max-depth", "8", "--ssh", target, "--ssh-config", str(config),
                                   "--remote-python", sys.executable, "-o", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "plan.json").read_text())
    assert doc["device"] == "newbox" and doc["profile_source"] == "measured" and doc["figures"] == "measured"
    assert doc["measured"]["p90_ms"] <= 5.0 and doc["ssh"] == target and not (tmp_path / "profiles").exists()
    assert "no profile of newbox yet" in res.output


def test_profile_ssh_passes_its_measuring_options_to_the_kit(sshd: tuple[str, Path], tmp_path: Path) -> None:
    """``profile --ssh`` measures with the options it was given: ``--rounds``, ``--no-memory`` and ``--repeats``
    reach the kit that runs on the target (its protocol is recorded in the imported profile; before, the kit ran
    its defaults whatever was given), and the import pools the repeats' rounds."""
    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app

    target, config = sshd
    out = tmp_path / "loop.json"
    res = CliRunner().invoke(app, ["profile", "--device", "loop", "--ssh", target, "--ssh-config", str(config),
                                   "--remote-python", sys.executable, "--depths", "1,2", "--rounds", "2",
                                   "--repeats", "2", "--no-memory", "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    entry = DeviceProfile.load(out).entries[0]
    protocol = entry.basis["kit"]["protocol"]
    assert (protocol["rounds"], protocol["repeats"], protocol["memory"]) == (2, 2, False)
    assert all(p.rounds >= 4 for p in entry.points), entry.points  # at least 2 rounds from each repeat, pooled


def test_repeats_without_ssh_is_refused() -> None:
    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app

    res = CliRunner().invoke(app, ["profile", "--repeats", "3", "--depths", "1,2"])
    assert res.exit_code != 0 and "--repeats is for --ssh" in res.output


def test_an_unreachable_target_fails_before_a_kit_is_built(tmp_path: Path) -> None:
    """A target that refuses the connection is reported at once, with its port, before any model is exported
    (before, the kit was built first: minutes for a large model), and nothing is written."""
    import shutil

    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app

    if shutil.which("ssh") is None:
        pytest.skip("no OpenSSH client")
    port = free_port()
    out = tmp_path / "nobox.json"
    res = CliRunner().invoke(app, ["profile", "--device", "nobox", "--ssh", f"nobody@127.0.0.1:{port}", "-o",
                                   str(out)])
    said = " ".join(res.output.split())
    assert res.exit_code != 0 and f"ssh nobody@127.0.0.1:{port} failed" in said, said
    assert "making the" not in said and not out.exists() and not list(tmp_path.iterdir())
