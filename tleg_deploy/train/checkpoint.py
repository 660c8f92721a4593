"""Training checkpoints without pickle: tensors in safetensors, everything else in its JSON metadata.

A checkpoint holds the model parameters (``model.<name>``), the AdamW state (``optim.<index>.<key>``),
the CPU random-number state, and as JSON: the epoch just finished, the optimizer's param groups,
the metric history and the run's configuration. Written atomically at the end of every epoch, so an
interrupted run resumes from the last finished epoch with the same optimizer state.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tleg_deploy.errors import CheckpointError
from tleg_deploy.files.tensorfile import read_tensor_file, write_tensor_file
from tleg_deploy.model.finite import check_finite

FORMAT = "tleg-train-checkpoint"
_META = {"state"}


@dataclass
class Checkpoint:
    epoch: int                    # epochs finished
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]     # torch optimizer state_dict
    rng: torch.Tensor
    history: list[dict[str, Any]]
    config: dict[str, Any]


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    history: list[dict[str, Any]], config: dict[str, Any]) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, state in opt["state"].items():
        for key, value in state.items():
            tensors[f"optim.{idx}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng"] = torch.get_rng_state()
    meta = {"epoch": epoch, "param_groups": opt["param_groups"], "history": history, "config": config}
    write_tensor_file(path, tensors, FORMAT, {"state": json.dumps(meta, default=_jsonable)})


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    tensors, meta = read_tensor_file(path, FORMAT, _META)
    try:
        state = json.loads(meta["state"])
        epoch, groups, history, config = state["epoch"], state["param_groups"], state["history"], state["config"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path} has invalid training state: {e}") from None
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    model: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith("model."):
            model[k.removeprefix("model.")] = v
        elif k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v
    check_finite(path, model, hint="the run diverged before this checkpoint was written; start afresh")
    if "rng" not in tensors:
        raise CheckpointError(f"{path} is missing tensor 'rng'")
    return Checkpoint(epoch, model, {"state": opt_state, "param_groups": groups}, tensors["rng"], history, config)


def restore(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    try:
        model.load_state_dict(ckpt.model, strict=True)
        optimizer.load_state_dict(ckpt.optimizer)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint does not match this model: {str(e).splitlines()[0]}",
                              hint="resume with the same model, depth and initialization") from None
    torch.set_rng_state(ckpt.rng)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.tolist()
    return str(value)
