"""Find a device profile by name, alias or path; ``host`` is this machine, measured on first use.

Lookup order for a name (first match wins, so a profile measured on the device replaces the
shipped estimate of the same name):

1. ``host`` — the cached measurement of this machine for the requested spec (user cache dir,
   keyed by a host fingerprint; re-measured when the fingerprint changes or with ``refresh``);
2. a path to a ``.json`` file;
3. ``./profiles/<name>.json``, then the directories in ``$TLEG_DEPLOY_PROFILES`` (``os.pathsep``
   separated), then the profiles shipped in the package (``tleg_deploy/profiles``) — by file
   name first, then by a profile's name or aliases.

An estimated profile of a datasheet device (``jetson``) answers for any spec: asked for a spec it has
no entries for, it gets them computed on the fly by ``profile.estimate`` (still ``source="estimated"``)
and cached next to the host profile (``estimated_for_spec``).

Torch-free: torch / onnxruntime are imported only when ``host`` must be measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tleg_deploy.errors import DeviceError, TlegError, UnknownDeviceError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile.table import DeviceProfile

ENV_DIRS = "TLEG_DEPLOY_PROFILES"
ENV_CACHE = "TLEG_DEPLOY_CACHE_DIR"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "profiles"
HOST = "host"
HOST_DEPTHS = (1, 6, 12)


def search_dirs() -> list[Path]:
    """Where profiles are looked up by name, in order."""
    dirs = [Path.cwd() / "profiles"]
    dirs += [Path(p) for p in os.environ.get(ENV_DIRS, "").split(os.pathsep) if p.strip()]
    dirs.append(SHIPPED_DIR)
    return dirs


def cache_dir() -> Path:
    override = os.environ.get(ENV_CACHE)
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tleg-deploy")) / "profiles"


def _is_path(name: str) -> bool:
    return name.endswith(".json") or os.sep in name or "/" in name


@dataclass(frozen=True)
class ScanResult:
    profiles: list[DeviceProfile]
    problems: list[str]   # "path: why" for files that could not be read


def scan_profiles() -> ScanResult:
    """Every readable profile in the search directories (first of a name wins), plus a cached
    ``host`` profile for this machine if one exists; unreadable files are listed as problems."""
    seen: set[str] = set()
    found: list[DeviceProfile] = []
    problems: list[str] = []
    host = _cached_host()
    if host is not None:
        found.append(host)
        seen.add(HOST)
    for d in search_dirs():
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.json")):
            try:
                prof = DeviceProfile.load(path)
            except TlegError as e:
                problems.append(str(e))
                continue
            if prof.name not in seen:
                seen.add(prof.name)
                found.append(prof)
    return ScanResult(found, problems)


def list_profiles() -> list[DeviceProfile]:
    return scan_profiles().profiles


def resolve_profile(name_or_path: str, *, spec: ViTSpec | None = None, refresh: bool = False,
                    quiet: bool = True) -> DeviceProfile:
    """The profile ``name_or_path`` names (see the module docstring for the order)."""
    name = str(name_or_path).strip()
    if not name:
        raise DeviceError("empty device name", hint="use host, a profile name (tleg-deploy devices) or a path")
    if name == HOST:
        return host_profile(spec, refresh=refresh, quiet=quiet)
    if _is_path(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise DeviceError(f"profile file {name!r} does not exist")
        return for_spec(DeviceProfile.load(path), spec)
    for d in search_dirs():  # by file name first: a broken file of that name is an error, not skipped
        path = d / f"{name}.json"
        if path.is_file():
            return for_spec(DeviceProfile.load(path), spec)
    scan = scan_profiles()
    for prof in scan.profiles:
        if name in prof.names:
            return for_spec(prof, spec)
    known = sorted({HOST, *(n for p in scan.profiles for n in p.names)})
    hint = f"known devices: {', '.join(known)}; or give a path to a profile .json"
    if scan.problems:
        hint += f" ({len(scan.problems)} unreadable profile file(s): {scan.problems[0]})"
    raise UnknownDeviceError(f"unknown device {name!r}", hint=hint)


# ---------------------------------------------------------------------------------------------
# host


def _host_path() -> Path:
    from tleg_deploy.profile.env import host_fingerprint

    return cache_dir() / f"host-{host_fingerprint()}.json"


def _cached_host() -> DeviceProfile | None:
    path = _host_path()
    if not path.is_file():
        return None
    try:
        return DeviceProfile.load(path)
    except TlegError:
        return None  # a damaged cache is simply re-measured


def host_precisions() -> tuple[str, ...]:
    """fp32, plus int8 when ONNX Runtime quantization is available."""
    import importlib.util

    try:
        have_quant = importlib.util.find_spec("onnxruntime.quantization") is not None
    except ModuleNotFoundError:
        have_quant = False
    return ("fp32", "int8") if have_quant else ("fp32",)


def host_profile(spec: ViTSpec | None = None, *, refresh: bool = False, quiet: bool = True) -> DeviceProfile:
    """This machine (ONNX Runtime CPU, 1 thread, batch 1), measured for ``spec`` on first use and
    cached; other specs already cached are kept."""
    return host_profile_measured(spec, refresh=refresh, quiet=quiet)[0]


def host_profile_measured(spec: ViTSpec | None = None, *, refresh: bool = False,
                          quiet: bool = True) -> tuple[DeviceProfile, bool]:
    """``host_profile``, and whether it was measured just now (True) rather than read from the cache."""
    cached = None if refresh else _cached_host()
    if cached is not None and (spec is None or cached.precisions(spec)):
        return cached, False
    from tleg_deploy.profile.measure import MeasureConfig, profile

    spec = spec or ViTSpec.preset("digits")
    cfg = MeasureConfig(backend="onnxruntime", precisions=host_precisions(), depths=HOST_DEPTHS, batch=1, threads=1)
    learngene = None
    if spec == ViTSpec.preset("digits"):
        from tleg_deploy.model.resources import load_learngene

        learngene = load_learngene("demo")
    prof = profile(spec, name=HOST, config=cfg, learngene=learngene, quiet=quiet, base=cached)
    prof.save(_host_path())
    return prof, True


def remember_probe(profile: DeviceProfile) -> None:
    """Keep the use-time drift probes of a probed host profile (``ProbeInfo.uses``, see ``profile.drift``) in
    the host cache, so the machine's variation between uses builds up over runs. Only the cache this module
    wrote, and only while it still holds the same measurement (same date and host): a profile file of the
    user's is never rewritten."""
    if profile.name != HOST or profile.probe is None or not profile.probe.uses:
        return
    cached = _cached_host()
    if cached is None or cached.probe is None or (cached.date, cached.host_fingerprint) != (
            profile.date, profile.host_fingerprint):
        return
    with contextlib.suppress(OSError):  # a read-only cache costs the record, not the command
        dataclasses.replace(cached, probe=profile.probe).save(_host_path())


def estimate_notice(profile: DeviceProfile) -> str | None:
    """For an estimated profile, the line every command using it prints; ``None`` if measured."""
    if profile.source != "estimated":
        return None
    return (f"{profile.name} is an ESTIMATED profile (datasheet roofline, not a measurement); "
            f"measure the real device with: {profile.measure_command}")


# ---------------------------------------------------------------------------------------------
# estimated profiles, for any spec


def for_spec(profile: DeviceProfile, spec: ViTSpec | None) -> DeviceProfile:
    """``profile``, with on-the-fly entries for ``spec`` when it is an estimated profile that lacks them."""
    if spec is None or profile.source != "estimated" or profile.precisions(spec, _batch(profile)):
        return profile
    return estimated_for_spec(profile, spec)


def _batch(profile: DeviceProfile) -> int:
    batch = profile.runtime.get("batch", 1)
    return batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else 1


def estimated_for_spec(profile: DeviceProfile, spec: ViTSpec) -> DeviceProfile:
    """``profile`` (estimated, of a device in the datasheets) plus entries for ``spec`` at its precisions
    and batch, computed by ``estimate.estimate_entry`` with the analytic MAC count of ``plan.costs`` (what
    fvcore counts; no torch) and the profile's own calibration, so they agree with its shipped entries.
    Cached in ``cache_dir()``, keyed by the spec, the datasheets, the estimator and the profile. A profile
    of a device not in the datasheets comes back unchanged (the solver then says it has no data)."""
    from tleg_deploy.plan import costs
    from tleg_deploy.plan.precisions import PRECISIONS
    from tleg_deploy.profile import estimate

    sheets_bytes = estimate.DATASHEETS.read_bytes()
    sheets = json.loads(sheets_bytes)
    device = next((n for n in profile.names if n in sheets.get("devices", {})), None)
    if device is None:
        return profile
    batch = _batch(profile)
    precisions = tuple(p for p in PRECISIONS if any(e.precision == p for e in profile.entries)) or tuple(
        estimate.SHIPPED_PRECISIONS)
    key = hashlib.sha256(json.dumps({
        "spec": spec.to_dict(), "device": device, "precisions": precisions, "batch": batch,
        "datasheets": hashlib.sha256(sheets_bytes).hexdigest(),
        "estimator": hashlib.sha256(Path(estimate.__file__).read_bytes()).hexdigest(),
        "profile": profile.to_dict()}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / f"estimated-{device}-{key}.json"
    if path.is_file():
        try:
            cached = DeviceProfile.load(path)
            if cached.precisions(spec, batch):
                return cached
        except TlegError:
            pass  # a damaged cache is simply recomputed
    calibration = next((dict(e.basis["compute_efficiency"]) for e in profile.entries
                        if e.basis and isinstance(e.basis.get("compute_efficiency"), dict)), None)
    calibration = calibration or estimate.calibrate_efficiency(sheets)  # once, not per precision
    floor = _shipped_floor(profile, device, sheets)
    macs = (batch * costs.block_macs(spec), batch * costs.fixed_macs(spec))
    entries = tuple(estimate.estimate_entry(device, spec, p, batch, sheets=sheets, macs=macs, floor=floor,
                                            calibration=calibration) for p in precisions)
    result = dataclasses.replace(
        profile, entries=profile.entries + entries, measure_command=estimate_measure_command(device, spec,
                                                                                             precisions, batch),
        notes=(profile.notes + " " if profile.notes else "") + "Entries for specs it did not ship with are "
        "computed on the fly from the same datasheets and calibration.")
    with contextlib.suppress(OSError):  # an unwritable cache costs a recomputation next time, nothing else
        result.save(path)
    return result


def estimate_measure_command(device: str, spec: ViTSpec, precisions: tuple[str, ...], batch: int) -> str:
    """The ``profile`` command that measures ``spec`` on ``device`` (spec as ``--spec`` accepts it)."""
    from tleg_deploy.model.spec_text import spec_arg

    return (f"tleg-deploy profile --device {device} --backend tensorrt --precision {','.join(precisions)} "
            f"--spec {spec_arg(spec)} --batch {batch} -o profiles/{device}.json")


def _shipped_floor(profile: DeviceProfile, device: str, sheets: dict[str, Any]) -> dict[str, Any] | None:
    """The per-kernel floor the shipped profile was computed with, in ``estimate.device_facts``' terms
    (at this device's own clock), so the on-the-fly entries need no fvcore re-calibration (torch)."""
    facts = sheets["devices"][device]["facts"]
    if facts.get("kernel_floor_us", {}).get("value") != "calibrated":
        return None  # a datasheet figure: nothing to calibrate
    for e in profile.entries:
        kf = (e.basis or {}).get("kernel_floor_us")
        if isinstance(kf, dict) and isinstance(kf.get("value"), (int, float)):
            clock = float(facts["gpu_clock_mhz"]["value"])
            return {"value": float(kf["value"]), "clock_mhz": clock, "point": "shipped profile"}
    return None
