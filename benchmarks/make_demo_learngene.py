"""Regenerate the bundled demo learngene, deterministically on the CPU (a few minutes on 2 cores).

1. Train a teacher: a plain ViT, 1.5x wider than the ``digits`` spec (96 wide, 6 heads), 12 deep,
   from the standard random init on the digits train split.
2. Train the Aux-Net (aux depth 12, ``digits`` spec) with pure soft distillation from it
   (alpha=1, tau=1, as TLEG) and save its learngene, with provenance, to
   ``tleg_deploy/data/demo_learngene.safetensors``.

    python benchmarks/make_demo_learngene.py [--out PATH] [--teacher-out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tleg_deploy.model.learngene import Learngene  # noqa: E402
from tleg_deploy.model.spec import ViTSpec  # noqa: E402
from tleg_deploy.model.vit import ViT  # noqa: E402

DEFAULTS: dict[str, Any] = dict(seed=0, teacher_epochs=30, aux_epochs=30, lr=1e-3, batch_size=32, aux_depth=12,
                                teacher_depth=12, teacher_width=96, teacher_heads=6)
OUT = Path(__file__).resolve().parent.parent / "tleg_deploy" / "data" / "demo_learngene.safetensors"


def teacher_spec(spec: ViTSpec, width: int, heads: int) -> ViTSpec:
    return dataclasses.replace(spec, embed_dim=width, num_heads=heads)


def build(quiet: bool = True, **overrides: Any) -> tuple[ViT, Learngene, dict[str, Any]]:
    """Teacher, then learngene; returns both and a record of what each cost."""
    from tleg_deploy.train.finetune import train_teacher
    from tleg_deploy.train.learngene import DistillConfig, train_learngene
    from tleg_deploy.train.loop import RunOptions, TrainConfig

    torch.set_num_threads(1)  # one thread: bit-for-bit reproducible, and fair timings
    p = {**DEFAULTS, **overrides}
    spec = ViTSpec.preset("digits")
    t0 = time.perf_counter()
    opts = RunOptions(quiet=quiet)
    teacher = train_teacher("digits", teacher_spec(spec, p["teacher_width"], p["teacher_heads"]), p["teacher_depth"],
                            TrainConfig(epochs=p["teacher_epochs"], seed=p["seed"], lr=p["lr"],
                                        batch_size=p["batch_size"]), opts)
    t1 = time.perf_counter()
    res = train_learngene("digits", teacher.model, TrainConfig(epochs=p["aux_epochs"], seed=p["seed"], lr=p["lr"],
                                                               batch_size=p["batch_size"]),
                          DistillConfig(aux_depth=p["aux_depth"]), opts, spec=spec)
    t2 = time.perf_counter()
    lg = res.learngene
    lg.provenance |= {
        "made_by": "benchmarks/make_demo_learngene.py", "teacher_epochs": p["teacher_epochs"],
        "aux_epochs": p["aux_epochs"], "teacher_test_acc": teacher.metrics["test_acc"],
        "teacher_val_acc": teacher.metrics["val_acc"],
    }
    cost = {"teacher_seconds": t1 - t0, "aux_seconds": t2 - t1, "teacher_train_images": teacher.metrics["train_images"],
            "aux_train_images": res.metrics["train_images"], "params": p,
            "teacher_metrics": teacher.metrics, "aux_metrics": res.metrics}
    return teacher.model, lg, cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--teacher-out", type=Path, default=None, help="also save the teacher here")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    teacher, lg, cost = build(quiet=args.quiet)
    lg.save(args.out)
    if args.teacher_out is not None:
        from tleg_deploy.model.expansion import save_descendant

        save_descendant(teacher, args.teacher_out, "", {"made_by": "make_demo_learngene", **cost["teacher_metrics"]})
    pv = lg.provenance
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes, sha256 {lg.sha256()[:12]}): teacher test acc "
          f"{pv['teacher_test_acc']:.3f} ({cost['teacher_seconds']:.0f} s), Aux-Net test acc {pv['aux_test_acc']:.3f} "
          f"({cost['aux_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
