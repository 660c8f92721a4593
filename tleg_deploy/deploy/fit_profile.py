"""Step 1 of ``deploy.fit``: the profile a fit solves on, wherever the device is. ``host`` and named profiles
come from the registry (a measured profile of this host is drift-probed); a device reached over SSH is the
profile named, or one measured there now with a device kit; a device kit's recorded run is imported.
``runs_here``: whether this machine can time the artifact itself. Torch-free but for the drift probe.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tleg_deploy.errors import FormatError, TlegError, UnknownDeviceError

if TYPE_CHECKING:
    from tleg_deploy.deploy.fit_types import FitRequest
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile.table import DeviceProfile

Log = Callable[[str], None]


def resolve_device_profile(request: FitRequest, spec: ViTSpec, quiet: bool, log: Log | None = None) -> DeviceProfile:
    """The profile fit solves on: a device kit's run (``kit_results``), the ``DeviceProfile`` given, the
    device's over SSH (``ssh_profile``), else the named one, drift-probed when it was measured on this host."""
    if request.kit_results is not None:
        return _kit_profile(request.kit_results, request, spec)
    if not isinstance(request.device, str):
        return request.device
    if request.ssh is not None:
        return _ssh_profile(request, spec, log)
    from tleg_deploy.profile.drift import probe_and_apply
    from tleg_deploy.profile.registry import HOST, host_profile_measured, remember_probe, resolve_profile

    if request.device == HOST:
        prof, measured_now = host_profile_measured(spec, refresh=request.refresh_profile, quiet=quiet)
    else:  # a profile file re-measures nothing here; --refresh-profile still skips its probe, as it always did
        prof, measured_now = resolve_profile(request.device, spec=spec, quiet=quiet), request.refresh_profile
    if prof.source != "measured" or measured_now:  # nothing to probe, or measured just now
        return prof
    # The drift probe (about 1 s): how fast this host is now against its profile, rescaled beyond ±5%.
    # Its reading reaches the user once, through the plan's warnings (fit's notes, REPORT.md).
    if log is not None:
        log(f"drift probe of {prof.name} ...")
    probed = probe_and_apply(prof)
    remember_probe(probed)
    return probed


def _ssh_profile(request: FitRequest, spec: ViTSpec, log: Log | None) -> DeviceProfile:
    """The profile of the device reached over SSH: the one ``--device`` names (a remote device's profile is
    never drift-probed here: the measured steps on the device stand in for it), else (or with
    ``refresh_profile``) one measured there now with a device kit (ONNX Runtime at depths 1, 6, 12: the
    precisions asked for, else fp32 + int8; peak memory only under a memory budget)."""
    from tleg_deploy.profile.registry import HOST, resolve_profile

    assert isinstance(request.device, str) and request.ssh is not None
    if request.device == HOST:
        raise TlegError("--ssh measures another machine: name it", hint="e.g. --device orin --ssh user@orin")
    try:
        prof = resolve_profile(request.device, spec=spec)
    except UnknownDeviceError:
        pass  # measured on the device below
    else:
        if not request.refresh_profile:  # else: measured again on the device below
            if prof.source == "measured" and runs_here(prof):
                raise TlegError(f"{request.device} is a profile of this host, not of {request.ssh.describe()}",
                                hint="name the remote device (a new name is profiled over SSH first)")
            return prof
    from tleg_deploy.model.resources import load_learngene
    from tleg_deploy.profile.config import MeasureConfig
    from tleg_deploy.profile.kit import KitConfig
    from tleg_deploy.profile.registry import host_precisions
    from tleg_deploy.profile.remote import profile_over_ssh

    name = Path(request.device).stem
    if log is not None:
        log(f"{'re-measuring the profile' if request.refresh_profile else 'no profile'} of {name}"
            f"{'' if request.refresh_profile else ' yet'}: measuring one on {request.ssh.describe()} with a device "
            "kit ...")
    precisions = tuple(p for p in (request.search.precisions or host_precisions()) if p in host_precisions())
    cfg = KitConfig(device=name, measure=MeasureConfig(precisions=precisions or host_precisions(), depths=(1, 6, 12),
                                                       memory=request.budget.memory_mb is not None))
    return profile_over_ssh(spec, cfg, request.ssh, learngene=load_learngene(request.learngene), progress=log)


def _kit_profile(kit_dir: Path, request: FitRequest, spec: ViTSpec) -> DeviceProfile:
    """The measured profile of a device kit's run (``fit --kit-results``), named after ``--device``; the kit
    must have measured this learngene's model (its spec) at batch 1."""
    from tleg_deploy.model.spec import ViTSpec
    from tleg_deploy.profile.kit import read_kit_json
    from tleg_deploy.profile.kit_import import import_kit

    kit = read_kit_json(kit_dir)
    if ViTSpec.from_dict(kit["spec"]) != spec or kit.get("batch") != 1:
        raise FormatError(f"the kit in {kit_dir} measured another model (or batch {kit.get('batch')}) than the "
                          "learngene's at batch 1",
                          hint=f"make the kit with tleg-deploy kit --learngene {request.learngene} --batch 1")
    name = request.device if isinstance(request.device, str) else request.device.name
    return import_kit(kit_dir, name=Path(name).stem if name.endswith(".json") else name)


def runs_here(profile: DeviceProfile) -> bool:
    """A measured ONNX Runtime CPU profile of this very host: we can time the artifact ourselves."""
    if profile.source != "measured" or profile.backend != "onnxruntime" or profile.kind != "cpu":
        return False
    from tleg_deploy.profile.env import host_fingerprint

    return profile.host_fingerprint == host_fingerprint()
