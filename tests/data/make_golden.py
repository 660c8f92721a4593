"""Regenerate ``tests/data/golden_demo_logits.npz`` (by hand only; the tests never call this).

    PYTHONPATH=. python tests/data/make_golden.py

Run it only when a change to the expansion or the ViT's numerics is *meant* to change the demo
learngene's outputs (or the bundled learngene was retrained), and say so in the commit message:
``tests/test_golden.py`` exists to make such a change fail loudly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tleg_deploy.model.expansion import expand
from tleg_deploy.model.resources import load_learngene

OUT = Path(__file__).resolve().parent / "golden_demo_logits.npz"
DEPTHS = (6, 12)
SEED = 0
BATCH = 8


def main() -> None:
    torch.set_num_threads(1)  # as in tests/conftest.py
    lg = load_learngene("demo")
    g = torch.Generator().manual_seed(SEED)
    spec = lg.spec
    inputs = torch.randn(BATCH, spec.in_chans, spec.img_size, spec.img_size, generator=g)
    arrays: dict[str, np.ndarray] = {
        "inputs": inputs.numpy(),
        "learngene_sha256": np.array(lg.sha256()),
        "depths": np.array(DEPTHS),
    }
    with torch.no_grad():
        for depth in DEPTHS:
            arrays[f"logits_{depth}"] = expand(lg, depth).eval()(inputs).numpy()
    np.savez_compressed(OUT, **arrays)  # type: ignore[arg-type]
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) for learngene {lg.sha256()[:12]}")


if __name__ == "__main__":
    main()
