"""Golden logits: the bundled demo learngene expanded to depths 6 and 12 must reproduce the outputs
stored in ``tests/data/golden_demo_logits.npz`` to 1e-5, so any change to the expansion rule, the
ViT's layer order or its numerics fails here. Regenerate only on purpose:
``PYTHONPATH=. python tests/data/make_golden.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tleg_deploy.model.expansion import expand
from tleg_deploy.model.resources import load_learngene

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_demo_logits.npz"


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return {k: data[k] for k in data.files}


def test_golden_file_is_for_the_bundled_learngene(golden: dict[str, np.ndarray]) -> None:
    sha = load_learngene("demo").sha256()
    assert str(golden["learngene_sha256"]) == sha, (
        "the bundled demo learngene changed; if that was meant, regenerate with tests/data/make_golden.py"
    )
    assert [int(d) for d in golden["depths"]] == [6, 12]


@pytest.mark.parametrize("depth", [6, 12])
def test_demo_expansion_reproduces_golden_logits(golden: dict[str, np.ndarray], depth: int) -> None:
    lg = load_learngene("demo")
    x = torch.from_numpy(golden["inputs"])
    want = torch.from_numpy(golden[f"logits_{depth}"])
    with torch.no_grad():
        got = expand(lg, depth).eval()(x)
    assert got.shape == want.shape == (8, lg.spec.num_classes)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_golden_depths_differ(golden: dict[str, np.ndarray]) -> None:
    """The two depths are different networks: a golden file that stored one output twice pins nothing."""
    assert np.abs(golden["logits_6"] - golden["logits_12"]).max() > 0.1
