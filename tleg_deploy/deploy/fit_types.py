"""What a ``fit`` job is asked (``FitRequest``, with the solver's ``SearchOptions``) and what it answers
(``FitResult``, written as ``plan.json``). Frozen and validated when made, so a bad option fails before
a device is measured or a directory written. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tleg_deploy.errors import TlegError
from tleg_deploy.plan.solve import Budget, Candidate, Plan, check_options
from tleg_deploy.profile.artifact import Measurement

if TYPE_CHECKING:
    from tleg_deploy.profile.remote import SshRun
    from tleg_deploy.profile.table import DeviceProfile

FIT_FORMAT = "tleg-fit"
SCHEMA_VERSION = 1
MAX_STEPS = 3


@dataclass(frozen=True)
class SearchOptions:
    """What the solver may pick (``plan.solve.solve``'s options): depths up to ``max_depth`` (None: twice
    the learngene's Aux-Net depth, or the accuracy table's deepest depth; ``solve.default_max_depth``), these
    ``precisions`` (None: all the profile has), the ``deepest`` or the most ``accurate`` (with an
    ``accuracy`` table ``{depth: top1}``), with ``margin`` extra headroom on predicted figures."""

    margin: float = 0.0
    max_depth: int | None = None
    precisions: tuple[str, ...] | None = None
    objective: str = "deepest"
    accuracy: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        if self.precisions is not None:
            object.__setattr__(self, "precisions", tuple(self.precisions))
        check_options(max_depth=self.max_depth, precisions=self.precisions, objective=self.objective,
                      margin=self.margin, accuracy=self.accuracy)


@dataclass(frozen=True)
class FitRequest:
    """One fit job. ``device``: a profile name or path (``registry.resolve_profile``; ``host`` is measured
    on first use, ``refresh_profile`` re-measures it) or a ``DeviceProfile``. ``finetune_data`` (digits,
    folder:PATH, npz:PATH) fine-tunes the pick for ``epochs``; ``calib_data`` (same forms) is what the
    quantized variants are validated and calibrated on (default: ``finetune_data``, else the data the
    learngene was trained on, where it is still there, else digits). ``measure``: time the artifact where the
    profile was measured on this host and search, measuring, for the deepest depth within budget (at most
    ``2 * max_steps`` measurements after the pick's; ``deploy.fit_measure``). ``kit_results``: a device kit
    directory whose ``run.sh`` has run on the device (``tleg-deploy kit``): its profile (named ``device``) is
    solved on and the depths it measured decide the steps instead. ``ssh``: the device is reached over SSH
    (``profile.remote``): device kits run there measure the pick and each step; a device without a profile is
    profiled there first (ONNX Runtime, fp32 + int8)."""

    budget: Budget
    device: str | DeviceProfile
    out_dir: Path
    learngene: str = "demo"
    search: SearchOptions = SearchOptions()
    finetune_data: str | None = None
    calib_data: str | None = None
    epochs: int = 5
    max_steps: int = MAX_STEPS
    measure: bool = True
    refresh_profile: bool = False
    kit_results: Path | None = None
    ssh: SshRun | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, Path):
            object.__setattr__(self, "out_dir", Path(os.fspath(self.out_dir)))
        if self.kit_results is not None and not isinstance(self.kit_results, Path):
            object.__setattr__(self, "kit_results", Path(os.fspath(self.kit_results)))
        for name in ("epochs", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "epochs" else 0):
                raise TlegError(f"{name} {value!r} must be a{' positive' if name == 'epochs' else ' non-negative'} "
                                "integer")


@dataclass(frozen=True)
class FitResult:
    plan: Plan                               # the solver's answer (before any measured step)
    pick: Candidate                          # what was built, with its predicted figures
    out_dir: Path
    files: tuple[str, ...]
    measured: Measurement | None             # None: the target cannot be run here (figures are estimated)
    steps: tuple[str, ...] = ()              # each measured step (down or up), predicted vs measured
    finetune: Mapping[str, Any] | None = None
    measure_command: str = ""
    notes: tuple[str, ...] = field(default=())
    rejected: Mapping[str, str] = field(default_factory=dict)      # precision -> why its validation failed
    over_budget: Mapping[int, float] = field(default_factory=dict)  # depth -> measured latency (ms) over budget
    kit_results: str | None = None           # the device kit whose recorded run measured it (None: here, if at all)
    ssh: str | None = None                   # the SSH target whose kit runs measured it

    @property
    def depth(self) -> int:
        return self.pick.depth

    @property
    def precision(self) -> str:
        return self.pick.precision

    @property
    def figures(self) -> str:
        """``measured`` here; ``predicted`` from a measured profile; ``estimated`` from a roofline profile."""
        if self.measured is not None:
            return "measured"
        return "predicted" if self.plan.source == "measured" else "estimated"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FIT_FORMAT, "schema_version": SCHEMA_VERSION, "device": self.plan.device,
            "profile_source": self.plan.source, "figures": self.figures, "depth": self.depth,
            "precision": self.precision, "pick": self.pick.to_dict(), "out_dir": str(self.out_dir),
            "files": list(self.files),
            "measured": None if self.measured is None else asdict(self.measured),
            "steps": list(self.steps), "finetune": dict(self.finetune) if self.finetune else None,
            "measure_command": self.measure_command, "notes": list(self.notes),
            "rejected_precisions": dict(self.rejected),
            "measured_over_budget": {str(d): ms for d, ms in self.over_budget.items()}, "kit_results": self.kit_results,
            "ssh": self.ssh,
            "plan": self.plan.to_dict(),
        }
