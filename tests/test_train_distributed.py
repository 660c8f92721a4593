"""Two CPU processes under torchrun take the same step as one process with the same global batch.

One ``torchrun --nproc_per_node=2`` launch (each launch starts three interpreters that import torch)
runs, in every rank, the ``tleg-deploy finetune`` CLI and then an Aux-Net training; each test checks
one of the two against a single-process run.
"""

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

_RANK_SCRIPT = """
import sys, torch
from tleg_deploy.cli import main
from tleg_deploy.model.auxnet import AuxNet
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.train.distributed import is_main_process
from tleg_deploy.train.finetune import splits
from tleg_deploy.train.loop import TrainConfig, run_training
from tleg_deploy.train.losses import CrossEntropy

lg_path, data, finetuned, aux_out = sys.argv[1:5]
sys.argv = ["tleg-deploy", "finetune", "--learngene", lg_path, "--depth", "3", "--data", data, "--epochs", "1",
            "--batch-size", "70", "--warmup", "0", "--lr", "0.01", "--quiet", "--json", "-o", finetuned]
try:
    main()
except SystemExit as e:
    if e.code:
        raise
torch.set_num_threads(1)
lg = Learngene.load(lg_path)
train, val, _ = splits(data, lg.spec)
aux = AuxNet(lg)
run_training(aux, CrossEntropy(), train, val, TrainConfig(epochs=1, batch_size=70, warmup_epochs=0.0, lr=0.01))
if is_main_process():
    aux.to_learngene().save(aux_out)
"""


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Learngene, Path, subprocess.CompletedProcess[str]]:
    """(the learngene, the run's directory, the torchrun process) of one two-rank launch."""
    from conftest import make_tiny_lg, make_tiny_spec

    tiny_lg = make_tiny_lg(make_tiny_spec())
    root = tmp_path_factory.mktemp("ddp")
    run = root / "run"
    run.mkdir()
    lg_path, data, script = root / "lg.safetensors", root / "d.npz", root / "ranks.py"
    tiny_lg.save(lg_path)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), 20)  # 14 train images per class: 70, split 35 + 35 over the ranks
    np.savez(data, x=rng.random((100, 8, 8, 3), dtype=np.float32), y=y)
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TLEG_DEBUG": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(lg_path), f"npz:{data}", str(run / "two.safetensors"), str(root / "aux_two.safetensors")],
        capture_output=True, text=True, timeout=180, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tiny_lg, root, proc


@pytest.mark.slow
def test_two_processes_step_like_one(ddp: tuple[Learngene, Path, subprocess.CompletedProcess[str]]) -> None:
    tiny_lg, root, proc = ddp
    data, out = root / "d.npz", root / "run" / "two.safetensors"
    assert proc.stdout.count('"output"') == 1  # only rank 0 reports
    assert sorted(p.name for p in out.parent.iterdir()) == ["two.run", "two.safetensors"]
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


@pytest.mark.slow
def test_aux_net_under_ddp_steps_like_one_process(ddp: tuple[Learngene, Path, subprocess.CompletedProcess[str]]
                                                  ) -> None:
    """The Aux-Net (functional_call over meta templates) trains under DDP with no special option."""
    from tleg_deploy.model.auxnet import AuxNet
    from tleg_deploy.train.finetune import splits
    from tleg_deploy.train.loop import TrainConfig, run_training
    from tleg_deploy.train.losses import CrossEntropy

    tiny_lg, root, _ = ddp
    lg_path, data, out = root / "lg.safetensors", root / "d.npz", root / "aux_two.safetensors"
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
