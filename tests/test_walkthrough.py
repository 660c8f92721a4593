"""README "Your own data": the shell block runs as written on a folder of 32x32 RGB PNGs.

The block is read from README.md (so the README cannot drift from what works); the only changes are
``$T`` running the CLI app in this process (typer's runner: the same commands and options, without a
2 s interpreter + torch start-up per command) and every ``--epochs N`` set to 1 to keep it fast.
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


@pytest.mark.slow
def test_readme_own_data_walkthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from tleg_deploy.cli.app import app

    commands = _block()
    assert not any("--spec" in c for cmd in commands for c in cmd), "the walk-through types no spec"
    _shapes(tmp_path / "shapes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TLEG_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    for cmd in commands:
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 0, f"{' '.join(cmd)}\n{res.output[-3000:]}\n{res.exception!r}"
        if cmd[0] == "train-teacher":
            assert "spec inferred from folder:shapes" in res.output

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
