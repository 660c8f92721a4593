"""``run_training``: the one training loop behind ``train_learngene`` and ``finetune``.

AdamW (no weight decay on biases, LayerNorms and position embeddings, as DeiT/timm), a per-step
cosine schedule with linear warm-up, optional gradient-norm clipping, bf16 autocast on CUDA only,
light shift augmentation drawn afresh per batch. Works single-process and under ``torchrun``: a
``DistributedSampler`` shards each global batch over ranks and DDP averages the gradients, so N
processes take the same steps as one process with the same global batch. At the end of every epoch
rank 0 writes an atomic checkpoint and ``metrics.jsonl`` (one JSON object per epoch); ``resume``
continues from the last finished epoch with the saved optimizer and random state.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from tleg_deploy.errors import CheckpointError, DataError, DivergedError, TlegError
from tleg_deploy.files.fileio import write_text_atomic
from tleg_deploy.model.finite import check_finite, first_non_finite
from tleg_deploy.train import distributed as D
from tleg_deploy.train.checkpoint import load_checkpoint, restore, save_checkpoint
from tleg_deploy.train.data import augment_batch

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation: what a run must share with a checkpoint it resumes (``_RESUME_KEYS``) and more."""

    epochs: int
    lr: float = 1e-3
    batch_size: int = 64           # global: split over the processes
    weight_decay: float = 0.05
    warmup_epochs: float | None = None  # None: min(1, 0.1 x epochs), so a short run is not mostly warm-up
    min_lr: float = 1e-5
    clip_grad: float | None = None
    seed: int = 0
    augment: bool = False         # random shifts; hurt on 8x8 digits at short budgets
    amp: bool = True               # bf16 autocast, CUDA only
    device: str | None = None      # default: cuda if available
    track_test: bool = False       # also record test accuracy after every epoch

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise TlegError(f"epochs {self.epochs!r} must be a non-negative integer")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise TlegError(f"learning rates lr={self.lr!r}, min_lr={self.min_lr!r} need 0 <= min_lr <= lr, lr > 0")
        if self.batch_size < 1:
            raise TlegError(f"batch size {self.batch_size!r} must be positive")
        if self.warmup_epochs is None:
            object.__setattr__(self, "warmup_epochs", min(1.0, 0.1 * self.epochs))
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise TlegError("weight_decay and warmup_epochs must be non-negative")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise TlegError(f"clip_grad {self.clip_grad!r} must be positive")


@dataclass(frozen=True)
class RunOptions:
    """Where a run keeps its state and how it reports: ``run_dir`` gets ``checkpoint.safetensors`` and
    ``metrics.jsonl`` after every epoch (rank 0), ``resume`` continues from them, ``quiet`` hides the bar."""

    run_dir: Path | None = None
    resume: bool = False
    quiet: bool = True

    def __post_init__(self) -> None:
        if self.run_dir is not None and not isinstance(self.run_dir, Path):
            object.__setattr__(self, "run_dir", Path(self.run_dir))
        if self.resume and self.run_dir is None:
            raise TlegError("resume needs the run directory that holds the checkpoint", hint="pass run_dir")


@dataclass
class Split:
    x: Tensor
    y: Tensor


@dataclass
class TrainResult:
    history: list[dict[str, Any]]
    seconds: float                 # wall time of this call (resumed epochs excluded)
    train_images: int              # images seen in training by this call, all processes
    resumed_from: int = 0


def lr_at(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """Linear warm-up from lr/warmup to lr, then cosine down to min_lr at the last step."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(split.y), batch_size):
        x = split.x[i:i + batch_size].to(device)
        with _autocast(device, enabled=True):
            logits = model(x)
        correct += int((logits.argmax(1).cpu() == split.y[i:i + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(split.y))


def run_training(
    model: nn.Module, criterion: nn.Module, train: Split, val: Split, cfg: TrainConfig,
    opts: RunOptions = RunOptions(), *, test: Split | None = None, label: str = "train",
    extra_config: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place with ``criterion(inputs, outputs, labels)``; returns the history.
    ``label`` and ``extra_config`` (the data, depth, ...) are saved with the checkpoint and must match
    on resume."""
    info = D.setup(cfg.device)
    if cfg.batch_size % info.world:
        raise TlegError(f"batch size {cfg.batch_size} is not divisible by the {info.world} processes")
    if len(train.y) == 0:
        raise TlegError("the training split is empty")
    for name, split in (("train", train), ("val", val), ("test", test)):
        if split is not None:
            check_finite(f"{name} split", {"images": split.x}, error=DataError,
                         hint="the data holds NaN or infinite pixels; clean it before training")
    device = info.device
    model.to(device)
    criterion.to(device)
    torch.manual_seed(cfg.seed)
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    run = opts.run_dir
    history: list[dict[str, Any]] = []
    start = 0
    config = {"label": label, **asdict(cfg), "world": info.world, **(extra_config or {})}
    if opts.resume and run is not None and (run / CHECKPOINT).is_file():
        ckpt = load_checkpoint(run / CHECKPOINT)
        _check_resumable(run / CHECKPOINT, ckpt.config, ckpt.epoch, config)
        restore(ckpt, model, optimizer)
        model.to(device)
        start, history = ckpt.epoch, ckpt.history
    net = D.wrap(model, info)  # DDP under torchrun: rank 0's parameters, averaged gradients

    dataset = TensorDataset(train.x, train.y)
    sampler: DistributedSampler[Any] = DistributedSampler(dataset, num_replicas=info.world, rank=info.rank,
                                                          shuffle=True, seed=cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size // info.world, sampler=sampler)
    steps_per_epoch = len(loader)
    total, warmup = cfg.epochs * steps_per_epoch, round((cfg.warmup_epochs or 0.0) * steps_per_epoch)
    t_start, seen = time.perf_counter(), 0
    with _progress(not opts.quiet and info.is_main, label, cfg.epochs, start) as bar:
        for epoch in range(start, cfg.epochs):
            model.train()
            sampler.set_epoch(epoch)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + info.rank)
            t0, loss_sum, correct, count = time.perf_counter(), 0.0, 0.0, 0.0
            for step, (x, y) in enumerate(loader):
                lr = lr_at(epoch * steps_per_epoch + step, total, warmup, cfg)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                if cfg.augment:
                    x = augment_batch(x, gen)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, cfg.amp):
                    out = net(x)
                    loss = criterion(x, out, y)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):  # stop before the step spreads it into the weights
                    raise _diverged(run, f"the loss is {loss_value} at epoch {epoch + 1}, step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad is not None:
                    nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                optimizer.step()
                loss_sum += loss_value * len(y)
                correct += float((out.detach().argmax(1) == y).sum())
                count += len(y)
                bar(epoch, step + 1, steps_per_epoch, loss_sum / count, correct / count)
            loss_sum, correct, count = D.all_reduce_sum([loss_sum, correct, count], info)
            if (bad := first_non_finite(model.named_parameters())) is not None:
                raise _diverged(run, f"parameter {bad!r} is not finite after epoch {epoch + 1}")
            seconds = time.perf_counter() - t0
            seen += int(count)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                "val_acc": evaluate(model, val, device), "lr": lr, "seconds": seconds,
                "images_per_s": count / seconds,
            }
            if test is not None and cfg.track_test:
                row["test_acc"] = evaluate(model, test, device)
            history.append(row)
            bar.epoch_done(row)
            if run is not None and info.is_main:
                save_checkpoint(run / CHECKPOINT, model, optimizer, epoch + 1, history, config)
                write_text_atomic(run / METRICS, "".join(json.dumps(r) + "\n" for r in history))
            D.barrier(info)
    return TrainResult(history, time.perf_counter() - t_start, seen, start)


# Settings a resumed run must share with the checkpoint (epochs, lr, ... may change: a longer schedule).
_RESUME_KEYS = ("label", "data", "depth", "aux_depth", "alpha", "tau", "batch_size", "seed", "augment")


def _diverged(run: Path | None, what: str) -> DivergedError:
    kept = ""
    if run is not None and (run / CHECKPOINT).is_file():
        kept = f"; {run / CHECKPOINT} still holds the last finished epoch"
    return DivergedError(f"training diverged: {what}{kept}",
                         hint="lower the learning rate, set clip_grad, or check the data and teacher")


def _check_resumable(path: Path, saved: dict[str, Any], epochs_done: int, config: dict[str, Any]) -> None:
    for key in _RESUME_KEYS:
        if key in saved and key in config and saved[key] != config[key]:
            raise CheckpointError(f"{path} was saved with {key}={saved[key]!r}, this run has {config[key]!r}",
                                  hint="resume with the same settings, or start afresh without --resume")
    if epochs_done > config["epochs"]:
        raise CheckpointError(f"{path} has {epochs_done} epochs done, more than the {config['epochs']} asked for",
                              hint="ask for at least as many epochs")


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Bar:
    """Progress callback: a rich bar on a terminal, nothing otherwise."""

    def __init__(self, progress: Any, task: Any, epochs: int) -> None:
        self.progress, self.task, self.epochs = progress, task, epochs
        self.last: dict[str, Any] = {}

    def __call__(self, epoch: int, step: int, steps: int, loss: float, acc: float) -> None:
        if self.progress is None:
            return
        ips = self.last.get("images_per_s")
        rate = f" {ips:,.0f} img/s" if ips else ""
        self.progress.update(self.task, total=self.epochs * steps, completed=epoch * steps + step,
                             description=f"epoch {epoch + 1}/{self.epochs} loss {loss:.3f} acc {acc:.3f}{rate}")

    def epoch_done(self, row: dict[str, Any]) -> None:
        self.last = row
        if self.progress is not None:
            self.progress.console.print(
                f"epoch {row['epoch']}: loss {row['train_loss']:.4f} train acc {row['train_acc']:.3f} "
                f"val acc {row['val_acc']:.3f} {row['images_per_s']:,.0f} img/s")


@contextlib.contextmanager
def _progress(enabled: bool, label: str, epochs: int, start: int) -> Iterator[_Bar]:
    from rich.console import Console

    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield _Bar(None, None, epochs)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task(f"epoch {start + 1}/{epochs}", total=None)
        yield _Bar(progress, task, epochs)
