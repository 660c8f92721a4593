"""Finding profiles: lookup order, the host cache, and the CLI's one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from tleg_deploy.cli.app import app
from tleg_deploy.errors import DeviceError, FormatError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile import registry
from tleg_deploy.profile.table import DeviceProfile, Point, make_entry

SPEC = ViTSpec.preset("digits")


def _measured(name: str, slope: float, aliases: tuple[str, ...] = (), fingerprint: str | None = None) -> DeviceProfile:
    pts = [Point(depth=d, p50_ms=0.1 + slope * d, p90_ms=0.12 + slope * d, p99_ms=0.2 + slope * d,
                 mean_ms=0.11 + slope * d, std_ms=0.01, n=30, rounds=3, p50_se_ms=0.001, p90_se_ms=0.002,
                 memory_mb=10 + d) for d in (1, 6, 12)]
    return DeviceProfile(name=name, aliases=aliases, source="measured", kind="cpu", backend="onnxruntime",
                         measure_command=f"tleg-deploy profile --device {name}", entries=(make_entry(SPEC, "fp32", 1,
                                                                                                      pts),),
                         host_fingerprint=fingerprint, date="2026-01-01")


def test_shipped_names_and_aliases(isolated) -> None:
    nano = registry.resolve_profile("jetson")
    assert nano.name == "jetson-orin-nano" and nano.source == "estimated"
    assert registry.resolve_profile("jetson-orin-nano") == nano
    assert registry.resolve_profile("h100").kind == "gpu"
    assert "estimated" in (registry.estimate_notice(nano) or "").lower()
    assert nano.measure_command in (registry.estimate_notice(nano) or "")
    names = {p.name for p in registry.list_profiles()}
    assert {"jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "h100"} <= names


def test_local_profiles_win_over_env_and_shipped(isolated, monkeypatch) -> None:
    env_dir = isolated / "team"
    _measured("jetson-orin-nano", 0.5, aliases=("jetson",)).save(env_dir / "jetson-orin-nano.json")
    _measured("lab-box", 0.7, aliases=("lab",)).save(env_dir / "anything.json")
    monkeypatch.setenv(registry.ENV_DIRS, str(env_dir))
    assert registry.resolve_profile("jetson").source == "measured"  # replaces the shipped estimate
    assert registry.resolve_profile("lab").name == "lab-box"  # found by alias in a differently named file
    _measured("jetson-orin-nano", 0.9).save(isolated / "profiles" / "jetson-orin-nano.json")
    local = registry.resolve_profile("jetson-orin-nano")
    assert local.entries[0].fit.latency_p50.slope == pytest.approx(0.9)
    # An explicit path is read as is.
    assert registry.resolve_profile(str(env_dir / "anything.json")).name == "lab-box"


def test_unknown_device_lists_known(isolated) -> None:
    with pytest.raises(DeviceError, match="unknown device 'nope'") as info:
        registry.resolve_profile("nope")
    assert "jetson-orin-nano" in str(info.value) and "host" in str(info.value)
    with pytest.raises(DeviceError, match="does not exist"):
        registry.resolve_profile("missing/profile.json")


def test_broken_file_of_that_name_is_an_error(isolated) -> None:
    (isolated / "profiles").mkdir()
    data = _measured("mybox", 0.5).to_dict()
    data["entries"][0]["points"][0]["p50_ms"] = 123.0  # tampered
    (isolated / "profiles" / "mybox.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"entries\[0\]\.fit\.latency_p50_ms"):
        registry.resolve_profile("mybox")
    scan = registry.scan_profiles()
    assert any("mybox.json" in p for p in scan.problems)
    assert "mybox" not in {p.name for p in scan.profiles}


def test_host_uses_the_cache_keyed_by_fingerprint(isolated) -> None:
    from tleg_deploy.profile.env import host_fingerprint

    fp = host_fingerprint()
    assert fp == host_fingerprint() and len(fp) == 16
    cached = _measured("host", 0.04, fingerprint=fp)
    cached.save(registry._host_path())
    assert registry._host_path().name == f"host-{fp}.json"
    assert registry.resolve_profile("host", spec=SPEC) == cached  # no re-measurement
    assert registry.host_profile_measured(SPEC) == (cached, False)  # read, not measured (fit probes it then)
    assert "host" in {p.name for p in registry.list_profiles()}
    # A cache written under another fingerprint is not this machine's.
    shutil.move(registry._host_path(), registry.cache_dir() / "host-0000000000000000.json")
    assert registry._cached_host() is None


runner = CliRunner()


def _fails(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code != 0, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, text
    return text


def test_cli_errors(isolated) -> None:
    _fails(["devices", "nope"], "unknown device 'nope'", "jetson-orin-nano")
    bad = isolated / "bad.json"
    data = _measured("mybox", 0.5).to_dict()
    data["runtime"]["backend"] = "tflite"
    bad.write_text(json.dumps(data))
    _fails(["devices", str(bad)], "runtime.backend")
    bad.write_text("{oops")
    _fails(["devices", str(bad)], "not valid JSON")
    _fails(["profile", "--backend", "tflite"], "unknown backend 'tflite'")
    _fails(["profile", "--depths", "0,6"], "depth 0")
    _fails(["profile", "--depths", "1,5000"], "depth 5000")
    _fails(["profile", "--depths", "one"], "cannot read depths")
    _fails(["profile", "--threads", "0"], "threads")
    _fails(["profile", "--spec", "deit-huge"], "unknown spec preset")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        _fails(["profile", "--backend", "tensorrt", "--device", "jetson"], "pip install")


def test_cli_devices_json(isolated) -> None:
    result = runner.invoke(app, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)["devices"]}
    assert rows["jetson-orin-nano"]["aliases"] == ["jetson"]
    assert rows["jetson-orin-nano"]["source"] == "estimated"
    assert rows["h100"]["backends"] == ["tensorrt"]
    assert "host" in rows
    shown = runner.invoke(app, ["devices", "jetson", "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["device"]["name"] == "jetson-orin-nano"


@pytest.mark.slow
def test_cli_profile_writes_a_measured_profile(isolated) -> None:
    """Measuring a known device writes profiles/<name>.json, which then replaces the shipped estimate."""
    result = runner.invoke(app, ["profile", "--device", "jetson", "--depths", "1,3", "--rounds", "2", "--no-memory",
                                 "-q"])
    assert result.exit_code == 0, result.output
    assert (isolated / "profiles" / "jetson-orin-nano.json").is_file()
    prof = registry.resolve_profile("jetson")
    assert prof.name == "jetson-orin-nano" and prof.aliases == ("jetson",)
    assert prof.source == "measured" and prof.precisions(SPEC) == ("fp32",)
    assert prof.entries[0].basis and "not measured" in prof.entries[0].basis["memory"]


def test_parse_depths() -> None:
    from tleg_deploy.errors import DepthError
    from tleg_deploy.export.family import parse_depths  # the one depth-list parser (profile uses it too)

    assert parse_depths("12,1,6") == [1, 6, 12]
    assert parse_depths("1-3,8") == [1, 2, 3, 8]
    for bad in ("5-2", "0-3", "1-5000", "x", "1,,2", "1,", ""):
        with pytest.raises(DepthError):
            parse_depths(bad)
