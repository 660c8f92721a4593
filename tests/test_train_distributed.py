"""Two CPU processes under torchrun take the same step as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tleg_deploy.model.expansion import expand, load_descendant
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.train.finetune import finetune
from tleg_deploy.train.loop import TrainConfig


@pytest.mark.slow
def test_two_processes_step_like_one(tiny_lg: Learngene, tmp_path: Path) -> None:
    lg_path, data = tmp_path / "lg.safetensors", tmp_path / "d.npz"
    tiny_lg.save(lg_path)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)  # 14 train images per class: 70, split 35 + 35 over the ranks
    np.savez(data, x=rng.random((100, 8, 8, 3), dtype=np.float32), y=y)
    args = ["--learngene", str(lg_path), "--depth", "3", "--data", f"npz:{data}", "--epochs", "1",
            "--batch-size", "70", "--warmup", "0", "--lr", "0.01", "--quiet", "--json"]
    cli = Path(sys.executable).with_name("tleg-deploy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TLEG_DEBUG": "1"}
    out = tmp_path / "two.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(cli), "finetune",
         *args, "-o", str(out)], capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('"output"') == 1  # only rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "lg.safetensors", "two.run", "two.safetensors"]
    two, _ = load_descendant(out)

    one = finetune(expand(tiny_lg, 3), f"npz:{data}", TrainConfig(epochs=1, batch_size=70, warmup_epochs=0.0,
                                                                  lr=0.01)).model
    start = expand(tiny_lg, 3).state_dict()
    moved, d = 0, tiny_lg.spec.embed_dim
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        moved += not torch.equal(a, start[name])
        if name.endswith("attn.qkv.bias"):
            # The key bias has an exactly-zero gradient (softmax ignores a per-query shift), so Adam's
            # g / (|g| + eps) turns float rounding noise into visible updates: compare q and v only.
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    assert moved > 0.9 * len(start)  # the step really changed the parameters


_AUX_SCRIPT = """
import sys, torch
from tleg_deploy.model.auxnet import AuxNet
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.train.distributed import is_main_process
from tleg_deploy.train.finetune import splits
from tleg_deploy.train.loop import TrainConfig, run_training
from tleg_deploy.train.losses import CrossEntropy

torch.set_num_threads(1)
lg = Learngene.load(sys.argv[1])
train, val, _ = splits(sys.argv[2], lg.spec)
aux = AuxNet(lg)
run_training(aux, CrossEntropy(), train, val, TrainConfig(epochs=1, batch_size=70, warmup_epochs=0.0, lr=0.01))
if is_main_process():
    aux.to_learngene().save(sys.argv[3])
"""


def test_aux_net_under_ddp_steps_like_one_process(tiny_lg: Learngene, tmp_path: Path) -> None:
    """The Aux-Net (functional_call over meta templates) trains under DDP with no special option."""
    from tleg_deploy.model.auxnet import AuxNet
    from tleg_deploy.train.finetune import splits
    from tleg_deploy.train.loop import TrainConfig, run_training
    from tleg_deploy.train.losses import CrossEntropy

    lg_path, data, script, out = (tmp_path / n for n in ("lg.safetensors", "d.npz", "aux.py", "two.safetensors"))
    tiny_lg.save(lg_path)
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((100, 8, 8, 3), dtype=np.float32), y=np.repeat(np.arange(5), 20))
    script.write_text(_AUX_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(lg_path), f"npz:{data}", str(out)], capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    two = Learngene.load(out)

    aux = AuxNet(Learngene.load(lg_path))
    train, val, _ = splits(f"npz:{data}", tiny_lg.spec)
    run_training(aux, CrossEntropy(), train, val, TrainConfig(epochs=1, batch_size=70, warmup_epochs=0.0, lr=0.01))
    one, d = aux.to_learngene(), tiny_lg.spec.embed_dim
    moved = 0
    for part in ("shared", "base", "slope"):
        for name, a in getattr(one, part).items():
            b = getattr(two, part)[name]
            moved += not torch.equal(a, getattr(tiny_lg, part)[name])
            if name.endswith("attn.qkv.bias"):  # the key bias: see test_two_processes_step_like_one
                a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"{part}.{name}")
    assert moved > 0.9 * (len(one.shared) + len(one.base) + len(one.slope))
