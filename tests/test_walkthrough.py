"""README "Your own data": the shell block runs as written on a folder of 32x32 RGB PNGs.

The block is read from README.md (so the README cannot drift from what works); the only changes are
``$T`` running the CLI app in this process (typer's runner: the same commands and options, without a
2 s interpreter + torch start-up per command) and every ``--epochs N`` set to 1 to keep it fast.
The block runs once per module; a second test fits on the host profile it measured and cached.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
CLASSES = ("circle", "square", "stripes")


def _block() -> list[list[str]]:
    text = README.read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    body = re.search(r"```sh\n(.*?)```", section, re.S)
    assert body, "README's 'Your own data' has no ```sh block"
    commands = []
    for line in body.group(1).splitlines():
        if not line.strip() or line.startswith("T="):
            continue
        words = shlex.split(re.sub(r"--epochs \d+", "--epochs 1", line))
        assert words[0] == "$T", line
        commands.append(words[1:])
    return commands


def _shapes(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(20):
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            if name == "circle":
                img[(yy - 16) ** 2 + (xx - 16) ** 2 < 80] = 220
            elif name == "square":
                img[8:24, 8:24] = 220
            else:
                img[::4] = 220
            Image.fromarray(img).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def walked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The README block run once for the module, in a fresh directory with a private profile cache: the
    directory (the cache in ``cache/`` holds the host profile ``fit --device host`` measured) and each
    command's output by its first word and output name."""
    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app

    root = tmp_path_factory.mktemp("walk")
    commands = _block()
    assert not any("--spec" in c for cmd in commands for c in cmd), "the walk-through types no spec"
    _shapes(root / "shapes")
    outputs: dict[str, str] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("TLEG_DEPLOY_CACHE_DIR", str(root / "cache"))
        for cmd in commands:
            res = CliRunner().invoke(app, cmd)
            assert res.exit_code == 0, f"{' '.join(cmd)}\n{res.output[-3000:]}\n{res.exception!r}"
            outputs[f"{cmd[0]} {cmd[-1]}"] = res.output
    return root, outputs


@pytest.mark.slow
def test_readme_own_data_walkthrough(walked: tuple[Path, dict[str, str]]) -> None:
    tmp_path, outputs = walked
    assert "spec inferred from folder:shapes" in outputs["train-teacher teacher.safetensors"]
    # fit-host measured this host's profile for the new spec, so it did not drift-probe it (a cached one is)
    host_plan = json.loads((tmp_path / "fit-host" / "plan.json").read_text())
    assert host_plan["figures"] == "measured" and host_plan["plan"]["drift"] is None
    assert "drift probe" not in outputs["fit fit-host"]
    for fit_dir in ("fit-host", "fit-jetson"):
        labels = json.loads((tmp_path / fit_dir / "labels.json").read_text())
        assert labels["classes"] == list(CLASSES)
        assert labels["preprocessing"]["img_size"] == 32 and labels["preprocessing"]["channels"] == 3
        plan = json.loads((tmp_path / fit_dir / "plan.json").read_text())
        onnx_file = next((tmp_path / fit_dir).glob("depth_*/model.onnx"))
        meta = {p.key: p.value for p in onnx.load(str(onnx_file), load_external_data=False).metadata_props}
        assert json.loads(meta["data"])["classes"] == list(CLASSES), plan["pick"]
    report = (tmp_path / "shapes-report" / "report.md").read_text()
    assert "`fit-host`" in report and "`fit-jetson`" in report


@pytest.mark.slow
def test_fit_on_the_cached_host_profile_then_on_estimated_ones(walked: tuple[Path, dict[str, str]], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``fit --device host`` on the host profile the walk-through's fit measured and cached (drift-probed first,
    then measured steps), JSON into the same directory, and jetson's estimated profile."""
    from conftest import check_fit_dir
    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app
    from tleg_deploy.model.resources import learngene_spec
    from tleg_deploy.profile.registry import resolve_profile

    root, _ = walked
    monkeypatch.chdir(root)
    monkeypatch.setenv("TLEG_DEPLOY_CACHE_DIR", str(root / "cache"))
    runner = CliRunner()
    spec = learngene_spec("shapes.safetensors")
    assert list((root / "cache").glob("host-*.json")), "the walk-through's fit cached no host profile"
    host = resolve_profile("host", spec=spec)
    assert host.source == "measured" and host.precisions(spec)
    up = {d: min(host.predict(d, spec=spec, precision=p).latency_p90_upper_ms for p in host.precisions(spec))
          for d in (4, 5)}
    budget_ms = round((up[4] + up[5]) / 2 * 1000, 1) / 1000  # between depth 4 and 5 of the fastest option, as
    # the CLI gets it below (in us, 1 decimal): the measured pick is checked against the budget fit was given
    # fit solves on the profile as probed now (drift-rescaled), so its pick is checked against its own plan.

    out = tmp_path / "host"
    res = runner.invoke(app, ["fit", "--learngene", "shapes.safetensors", "--device", "host", "--latency",
                              f"{budget_ms * 1000:.1f}us", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "measured" in res.output and "why not deeper" in res.output
    assert "drift probe of host" in res.output  # the cached profile was probed before the solve
    plan = check_fit_dir(out)
    assert plan["figures"] == "measured" and plan["measured"]["p90_ms"] <= budget_ms
    drift = plan["plan"]["drift"]
    assert drift["status"] in ("rescaled", "within") and drift["ratio"] > 0
    solved = plan["plan"]["depth"]
    # the measured search keeps the deepest depth measured within; every depth it measured over is deeper
    assert all(int(k) > plan["depth"] for k in plan["measured_over_budget"])
    assert plan["plan"]["why_not_deeper"].startswith(f"depth {solved + 1} does not fit")

    # Another fit, as JSON, into the same directory: replaced whole (a jetson fit: estimated, so no measuring).
    res = runner.invoke(app, ["fit", "--device", "jetson", "--latency", f"{budget_ms * 10:.4f}ms", "-o", str(out),
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["format"] == "tleg-fit" and doc["device"] != "host"
    assert doc["figures"] == "estimated" and check_fit_dir(out)["device"] == doc["device"]  # the host fit: gone

    out = tmp_path / "new" / "jetson"  # parents are created
    res = runner.invoke(app, ["fit", "--device", "jetson", "--latency", "1ms", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "estimated" in res.output and "tleg-deploy profile" in res.output
    plan = check_fit_dir(out)
    assert plan["figures"] == "estimated" and plan["measured"] is None and plan["depth"] >= 2
    assert plan["plan"]["drift"] is None and "drift probe" not in res.output  # estimates are not probed
    member = f"depth_{plan['depth']:02d}"
    assert f"{member}/build_engine.sh" in (out / "build_engine.sh").read_text()
    assert "trtexec" in (out / member / "build_engine.sh").read_text()
