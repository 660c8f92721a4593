from __future__ import annotations

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



# The longest modules, longest first (seconds on 2 cores, 2026-12-02); the rest follow in collection order. With
# `--dist loadfile --no-loadscope-reorder` (pyproject.toml) xdist hands modules to the workers in this order, so
# no long module starts last and leaves the other core idle (xdist's own order is by number of tests).
LONGEST_FIRST = ("test_remote_ssh.py", "test_fit.py", "test_walkthrough.py", "test_export_template.py",
                 "test_profile_measure.py", "test_reliability.py", "test_report.py", "test_train_distributed.py",
                 "test_fit_steps.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: collection order otherwise
