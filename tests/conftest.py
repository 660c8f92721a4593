from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec

torch.set_num_threads(1)


def make_tiny_spec() -> ViTSpec:
    """A spec small enough for sub-second tests (qkv bias on, no class token)."""
    return ViTSpec(img_size=8, patch_size=4, in_chans=3, embed_dim=16, num_heads=2, mlp_ratio=2.0,
                   num_classes=5)


def make_tiny_lg(tiny_spec: ViTSpec) -> Learngene:
    lg = Learngene.init(tiny_spec, aux_depth=4, seed=0)
    # Non-trivial slopes for LayerNorm and biases too, so every tensor's expansion is exercised.
    g = torch.Generator().manual_seed(1)
    for d in (lg.base, lg.slope, lg.shared):
        for k in d:
            d[k] = d[k] + 0.05 * torch.randn(d[k].shape, generator=g)
    return lg


def check_fit_dir(out: Path) -> dict:
    """The checks every ``fit`` output directory passes; returns its plan.json."""
    from tleg_deploy.files.fileio import sha256_file

    plan = json.loads((out / "plan.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert plan["format"] == "tleg-fit" and manifest["format"] == "tleg-export-manifest"
    depth, precision = plan["depth"], plan["precision"]
    assert list(manifest["members"]) == [str(depth)]  # one member: the pick, not the depths stepped over
    precisions = {a["precision"] for a in manifest["artifacts"] if a["format"] == "onnx"}
    assert "fp32" in precisions and (precision in precisions or f"{precision}-qdq" in precisions)
    weights = out / plan["weights"]["file"]
    assert weights.name == f"model_d{depth}.safetensors" and sha256_file(weights) == plan["weights"]["sha256"]
    for a in manifest["artifacts"]:
        assert sha256_file(out / a["file"]) == a["sha256"] and (out / a["file"]).stat().st_size == a["bytes"]
    assert (out / "build_engine.sh").stat().st_mode & 0o100
    report = (out / "REPORT.md").read_text()
    assert f"depth **{depth}**" in report and "## Candidates" in report
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left
    return plan


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def benchmarks_importable() -> Iterator[Path]:
    """``benchmarks/`` on ``sys.path`` for a test module that imports a benchmark script (its helpers)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield BENCHMARKS
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture
def tiny_spec() -> ViTSpec:
    return make_tiny_spec()


@pytest.fixture
def tiny_lg(tiny_spec: ViTSpec) -> Learngene:
    return make_tiny_lg(tiny_spec)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run in an empty directory with a private profile cache and no $TLEG_DEPLOY_PROFILES."""
    from tleg_deploy.profile import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(registry.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(registry.ENV_DIRS, raising=False)
    return tmp_path


# The longest modules, longest first (measured on 2 cores, 2026-12-02: about 20, 15, then 4-7 s each); the rest
# follow in collection order. With
# `--dist loadfile --no-loadscope-reorder` (pyproject.toml) xdist hands modules to the workers in this order, so
# no long module starts last and leaves the other core idle (xdist's own order is by number of tests).
LONGEST_FIRST = ("test_remote_ssh.py", "test_walkthrough.py", "test_reliability.py", "test_report.py",
                 "test_export_template.py", "test_train_distributed.py", "test_fit_steps.py", "test_profile_measure.py",
                 "test_fit.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: collection order otherwise
