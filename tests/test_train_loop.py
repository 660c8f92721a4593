from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from tleg_deploy.errors import CheckpointError, TlegError
from tleg_deploy.model.learngene import Learngene
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.model.vit import ViT, init_vit_
from tleg_deploy.train.finetune import finetune, splits, train_teacher
from tleg_deploy.train.learngene import DistillConfig, train_learngene
from tleg_deploy.train.loop import CHECKPOINT, METRICS, RunOptions, TrainConfig, lr_at, run_training
from tleg_deploy.train.losses import CrossEntropy, DistillationLoss


@pytest.fixture
def digit_spec() -> ViTSpec:
    """Tiny, but on the real digits data: 4x4 patches of the 8x8 images."""
    return ViTSpec(img_size=8, patch_size=4, in_chans=1, embed_dim=16, num_heads=2, mlp_ratio=2.0, num_classes=10)


def test_schedule_warms_up_then_decays_to_min_lr() -> None:
    cfg = TrainConfig(epochs=10, lr=1e-3, min_lr=1e-5)
    lrs = [lr_at(s, 100, 10, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-5, abs=1e-6)
    with pytest.raises(TlegError):
        TrainConfig(epochs=-1)


@pytest.mark.parametrize("bad", [{"aux_depth": 0}, {"alpha": 1.5}, {"tau": 0.0}, {"tau": float("nan")}])
def test_training_configs_reject_bad_values_when_made(bad: dict) -> None:
    with pytest.raises(TlegError):
        DistillConfig(**bad)
    with pytest.raises(TlegError, match="resume needs"):
        RunOptions(resume=True)
    assert RunOptions(run_dir="x.run").run_dir == Path("x.run")  # type: ignore[arg-type]


def test_distillation_loss_is_kl_at_tau_and_zero_against_itself() -> None:
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss = DistillationLoss(teacher, alpha=1.0, tau=2.0)
    assert float(loss(x, teacher(x).detach(), y)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(8, 3)
    p_t = torch.softmax(teacher(x).detach() / 2, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(student / 2, 1))).sum(1).mean() * 4
    assert float(loss(x, student, y)) == pytest.approx(float(kl), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(student, y)
    mixed = DistillationLoss(teacher, alpha=0.25, tau=2.0)(x, student, y)
    assert float(mixed) == pytest.approx(0.75 * float(ce) + 0.25 * float(kl), rel=1e-5)


def test_short_distillation_run_lowers_the_loss(digit_spec: ViTSpec, tmp_path: Path) -> None:
    teacher = train_teacher("digits", digit_spec, 2, TrainConfig(epochs=3, lr=3e-3, batch_size=128)).model
    init = Learngene.init(digit_spec, aux_depth=3, seed=0)
    res = train_learngene("digits", teacher, TrainConfig(epochs=4, lr=3e-3, batch_size=128),
                          opts=RunOptions(run_dir=tmp_path / "run"), learngene=init)
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert res.metrics["aux_test_acc"] > 0.3  # well above chance (0.1)
    assert res.learngene.provenance["trained"] is True
    assert res.learngene.provenance["teacher"]["depth"] == 2
    assert not torch.equal(res.learngene.slope["attn.qkv.weight"], init.slope["attn.qkv.weight"])
    lines = (tmp_path / "run" / METRICS).read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


class _Interrupt(torch.nn.Module):
    """Cross-entropy that raises KeyboardInterrupt at the n-th call: a run killed mid-epoch."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.calls, self.ce = n, 0, CrossEntropy()

    def forward(self, inputs: Tensor, outputs: Tensor, labels: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.ce(inputs, outputs, labels)


def test_resume_after_interruption_matches_an_uninterrupted_run(digit_spec: ViTSpec, tmp_path: Path) -> None:
    train, val, _ = splits("digits", digit_spec)
    train.x, train.y = train.x[:256], train.y[:256]  # 4 steps per epoch
    cfg = TrainConfig(epochs=4, lr=3e-3, batch_size=64, augment=True, seed=3)
    fresh = lambda: init_vit_(ViT(digit_spec, 2), torch.Generator().manual_seed(0))  # noqa: E731
    whole = fresh()
    run_training(whole, CrossEntropy(), train, val, cfg, RunOptions(run_dir=tmp_path / "a"))
    broken = fresh()
    with pytest.raises(KeyboardInterrupt):  # dies in epoch 3, after epoch 2's checkpoint
        run_training(broken, _Interrupt(n=10), train, val, cfg, RunOptions(run_dir=tmp_path / "b"))
    resumed = fresh()
    res = run_training(resumed, CrossEntropy(), train, val, cfg, RunOptions(run_dir=tmp_path / "b", resume=True))
    assert res.resumed_from == 2 and [h["epoch"] for h in res.history] == [1, 2, 3, 4]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(fresh().state_dict()["head.weight"], whole.state_dict()["head.weight"])
    assert not list((tmp_path / "b").glob(".*.tmp"))  # nothing half-written
    assert (tmp_path / "b" / CHECKPOINT).is_file()
    # a checkpoint of other settings, or of more epochs than asked for, is refused before any step
    for change, match in (({"seed": 4}, "seed=3"), ({"epochs": 3}, "4 epochs")):
        with pytest.raises(CheckpointError, match=match):
            run_training(fresh(), CrossEntropy(), train, val, dataclasses.replace(cfg, **change),
                         RunOptions(run_dir=tmp_path / "b", resume=True))


def test_finetune_reports_contract_metrics(digit_spec: ViTSpec) -> None:
    model = init_vit_(ViT(digit_spec, 1), torch.Generator().manual_seed(0))
    res = finetune(model, "digits", TrainConfig(epochs=2, lr=3e-3, batch_size=128, track_test=True))
    assert res.model is model
    for key in ("val_acc", "test_acc", "epochs", "seconds"):
        assert key in res.metrics
    assert res.metrics["epochs"] == 2
    test = splits("digits", digit_spec)[2]  # the reported accuracy is that of the returned model
    with torch.no_grad():
        acc = float((model.eval()(test.x).argmax(1) == test.y).float().mean())
    assert res.metrics["test_acc"] == pytest.approx(acc)
    assert res.history[-1]["test_acc"] == pytest.approx(res.metrics["test_acc"])


def test_warmup_default_scales_with_the_epochs() -> None:
    """A 2-epoch run is not half warm-up: the default is min(1, 0.1 x epochs); an explicit value stays."""
    from tleg_deploy.train.loop import TrainConfig

    assert TrainConfig(epochs=2).warmup_epochs == pytest.approx(0.2)
    assert TrainConfig(epochs=30).warmup_epochs == 1.0
    assert TrainConfig(epochs=2, warmup_epochs=0.0).warmup_epochs == 0.0
