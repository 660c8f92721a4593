"""Estimated profiles for hardware we cannot reach: MACs from fvcore, bytes moved, and a roofline
from datasheet figures, calibrated on a public measurement.

Per ViT block (and likewise for the fixed stem + head):

    t = max(2·MACs / (eff · peak[precision]),  bytes / (eff_bw · bandwidth))  +  kernels · floor

MACs — of the estimated blocks and of the calibration models — are counted with fvcore on the real
``ViT`` (fvcore's ``FlopCountAnalysis`` counts one multiply-add as one "flop") plus a handle for
``aten::scaled_dot_product_attention``, which fvcore does not know. The torch-free analytic count
in ``tleg_deploy.plan.costs`` (what the solver and budgets use) is the tests' oracle for it. Bytes are the
block's weights at the precision plus its activation traffic. The compute efficiency ``eff`` is
calibrated on NanoOWL's published Jetson AGX Orin TensorRT timings of two OWL-ViT encoders that
differ only in token count, so their latency *difference* cancels fixed pipeline costs — and the
per-kernel floor, which both pay alike. Every figure's source sits next to it in
``tleg_deploy/data/device_datasheets.json`` and is copied into the profile's JSON
(``device.hardware`` and each entry's ``basis``).

Held to public numbers (``tleg_deploy/data/published_timings.json``, checked by
``benchmarks/estimate_vs_published.py`` and ``tests/test_published.py``). Before this, the Jetson
kernel floor was an assumed 5 µs and the estimate of a DeiT-tiny-shape ViT on the Orin Nano was
1.15 ms (interval 0.69-1.6 ms) against a published 3.12 ms: 0.37x, outside the interval. The
compute efficiency was not at fault (a tiny ViT is nowhere near the roofline); the per-kernel cost
was. So we **recalibrated the kernel floor** on that point (``calibrate_kernel_floor``: what is
left of the published latency after the roofline, per kernel of the engine; about 27 µs at
625 MHz), scaled to the other Jetsons by GPU clock, and **widened the Jetson uncertainty** to 0.6,
because the floor now rests on one point of unstated power mode and the same device and JetPack
timed a compressed ViT-tiny 57% slower than the full one. The NanoOWL points are pipeline FPS
(fixed costs included), so they calibrate the efficiency but are not required inside the interval.
H100 has no public batch-1 TensorRT ViT timing: its figures stay assumptions (uncertainty 0.5).

Regenerate the shipped profiles: ``python -m tleg_deploy.profile.estimate`` (writes
``tleg_deploy/profiles/*.json``). Peak memory is weights + the largest live activations + a
workspace; the runtime's own libraries (CUDA context, TensorRT) are outside it, as they are
outside the measured CPU profiles' "RSS above the interpreter baseline".
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tleg_deploy.errors import FormatError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.plan.precisions import PRECISION
from tleg_deploy.profile.table import DeviceProfile, Entry, Point, make_entry

DATASHEETS = Path(__file__).resolve().parent.parent / "data" / "device_datasheets.json"
PUBLISHED = Path(__file__).resolve().parent.parent / "data" / "published_timings.json"
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
SHIPPED_SPECS = ("deit-tiny", "deit-small", "deit-base", "digits")
SHIPPED_PRECISIONS = ("fp16", "int8")
ESTIMATE_DEPTHS = (1, 12, 24, 48)
_PEAK_KEY = {"fp32": "peak_fp32_tflops", "fp16": "peak_fp16_tflops", "int8": "peak_int8_tops"}


def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle: QKᵀ and AV of ``scaled_dot_product_attention`` — 2·B·h·N·M·d multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    batch_heads = math.prod(q[:-2])
    return int(batch_heads * q[-2] * k[-2] * (q[-1] + v[-1]))


@functools.cache  # a traced ViT-B at 768 px takes seconds; the count never changes
def fvcore_macs(spec: ViTSpec, batch: int = 1, *, matmul_only: bool = True) -> tuple[int, int]:
    """(MACs per block, fixed MACs) of one forward pass of ``batch`` images, counted by fvcore on
    depth-1 and depth-2 models. ``matmul_only`` keeps conv/linear/matmul/attention (as costs.py)."""
    import torch

    with warnings.catch_warnings():  # fvcore scripts helpers at import time; torch.jit warns it is deprecated
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    from tleg_deploy.model.vit import ViT

    totals = []
    for depth in (1, 2):
        model = ViT(spec, depth).eval()
        x = torch.zeros(batch, spec.in_chans, spec.img_size, spec.img_size)
        flops = FlopCountAnalysis(model, x).set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        with warnings.catch_warnings():  # fvcore traces with torch.jit, which warns it is deprecated
            warnings.simplefilter("ignore")
            by_op = flops.by_operator()
        keep = ("conv", "linear", "addmm", "matmul", "bmm", "mm", "einsum", "scaled_dot_product_attention")
        totals.append(sum(v for k, v in by_op.items() if k in keep) if matmul_only else flops.total())
    block = totals[1] - totals[0]
    return int(block), int(totals[0] - block)


def load_datasheets(path: Path = DATASHEETS) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


PUBLISHED_FORMAT = "tleg-published-timings"
_POINT_KEYS = ("id", "device", "model", "img_size", "patch_size", "depth", "embed_dim", "heads", "mlp_ratio",
               "num_classes", "class_token", "nearest_preset", "precision", "batch", "latency_ms", "statistic",
               "tensorrt", "power_mode", "source", "note", "in_setting", "excluded_because")


def load_published(path: Path = PUBLISHED) -> list[dict[str, Any]]:
    """The public timings in ``published_timings.json``, checked: every key present, latency finite > 0,
    and a reason for every point outside the setting a profile predicts."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != PUBLISHED_FORMAT or data.get("schema_version") != 1:
        raise FormatError(f"{path} is not a {PUBLISHED_FORMAT} file of schema_version 1")
    points: list[dict[str, Any]] = data["points"]
    for p in points:
        missing = [k for k in _POINT_KEYS if k not in p]
        lat = p.get("latency_ms")
        if missing or not isinstance(lat, (int, float)) or not math.isfinite(lat) or lat <= 0:
            raise FormatError(f"{path}: point {p.get('id')!r} lacks {missing or 'a finite latency_ms > 0'}")
        if not p["in_setting"] and not p["excluded_because"]:
            raise FormatError(f"{path}: point {p['id']!r} is outside the setting without a reason")
    return points


def published_spec(point: dict[str, Any]) -> ViTSpec:
    """The architecture of a published point (its depth is ``point["depth"]``)."""
    return ViTSpec(img_size=point["img_size"], patch_size=point["patch_size"], in_chans=3,
                   embed_dim=point["embed_dim"], num_heads=point["heads"], mlp_ratio=point["mlp_ratio"],
                   num_classes=point["num_classes"], class_token=point["class_token"])


def _value(facts: dict[str, Any], key: str) -> float:
    return float(facts[key]["value"])


def calibrate_efficiency(sheets: dict[str, Any]) -> dict[str, Any]:
    """fp16 compute efficiency from the public measurement (difference of two latencies)."""
    cal = sheets["calibration"]
    peak = _value(sheets["devices"][cal["device"]]["facts"], "peak_fp16_tflops") * 1e12
    pts = []
    for p in cal["points"]:
        spec = ViTSpec(**p["spec"])
        block, fixed = fvcore_macs(spec)
        pts.append((2 * (fixed + p["depth"] * block), 1.0 / p["fps"]))
    (f1, t1), (f2, t2) = sorted(pts)
    eff = (f2 - f1) / (t2 - t1) / peak
    return {"value": eff, "source": cal["source"], "method": cal["method"],
            "points": [{"model": p["model"], "fps": p["fps"], "flops": f} for p, (f, _) in zip(cal["points"], pts,
                                                                                             strict=True)]}


def _roofline_s(spec: ViTSpec, depth: int, precision: str, batch: int, facts: dict[str, Any],
                a: dict[str, Any], eff: float, macs: tuple[int, int]) -> float:
    """Roofline time of a depth-``depth`` engine with no per-kernel floor (what the floor is fitted on)."""
    no_floor = {**facts, "kernel_floor_us": {"value": 0.0}}
    (t_block, _), (t_fixed, _) = _block_and_fixed(spec, precision, batch, no_floor, a, eff, macs)
    return t_fixed + depth * t_block


def calibrate_kernel_floor(sheets: dict[str, Any], calibration: dict[str, Any] | None = None,
                           published: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per-kernel floor (µs) of the calibration device from its public point: the published latency
    less the roofline time, shared by the engine's kernels (``depth·kernels_per_block + kernels_fixed``)."""
    fc = sheets["floor_calibration"]
    point = next(p for p in (published or load_published()) if p["id"] == fc["point"])
    dev = sheets["devices"][fc["device"]]
    a = sheets["assumptions"]
    cal = calibration or calibrate_efficiency(sheets)
    spec, depth, batch = published_spec(point), int(point["depth"]), int(point["batch"])
    facts = {k: v for k, v in dev["facts"].items() if k != "kernel_floor_us"}
    roof = _roofline_s(spec, depth, fc["precision"], batch, facts, a, cal["value"], fvcore_macs(spec, batch))
    kernels = depth * int(a["kernels_per_block"]["value"]) + int(a["kernels_fixed"]["value"])
    floor_us = (point["latency_ms"] * 1e-3 - roof) / kernels * 1e6
    if not math.isfinite(floor_us) or floor_us <= 0:
        raise FormatError(f"kernel-floor calibration on {point['id']!r} gives {floor_us:.3g} us",
                          hint="the published point is faster than the roofline without any floor")
    return {"value": floor_us, "clock_mhz": _value(dev["facts"], "gpu_clock_mhz"), "point": point["id"],
            "source": fc["source"], "method": fc["method"]}


def device_facts(name: str, sheets: dict[str, Any], floor: dict[str, Any] | None = None) -> dict[str, Any]:
    """The device's datasheet facts with a ``"calibrated"`` kernel floor resolved (scaled by GPU clock)."""
    facts = dict(sheets["devices"][name]["facts"])
    kf = facts.get("kernel_floor_us", {})
    if kf.get("value") == "calibrated":
        floor = floor or calibrate_kernel_floor(sheets)
        value = floor["value"] * floor["clock_mhz"] / _value(facts, "gpu_clock_mhz")
        facts["kernel_floor_us"] = {**kf, "value": round(value, 3),
                                    "source": f"{kf['source']}: {floor['value']:.2f} us at {floor['clock_mhz']:g} MHz "
                                              f"on point {floor['point']!r}"}
    return facts


def _block_and_fixed(spec: ViTSpec, precision: str, batch: int, facts: dict[str, Any], a: dict[str, Any],
                     eff: float, macs: tuple[int, int]) -> tuple[tuple[float, dict[str, float]],
                                                             tuple[float, dict[str, float]]]:
    from tleg_deploy.plan import costs

    block_macs, fixed_macs = macs
    n, d = batch * spec.num_tokens, spec.embed_dim
    block = _part_time_s(block_macs, costs.block_params(spec), int(a["activation_passes_per_block"]["value"]) * n * d,
                         int(a["kernels_per_block"]["value"]), precision, facts, a, eff)
    fixed = _part_time_s(fixed_macs, costs.fixed_params(spec), 4 * n * d + batch * spec.in_chans * spec.img_size**2,
                         int(a["kernels_fixed"]["value"]), precision, facts, a, eff)
    return block, fixed


def _part_time_s(macs: int, weight_params: int, act_elems: int, kernels: int, precision: str,
                 facts: dict[str, Any], a: dict[str, Any], eff: float) -> tuple[float, dict[str, float]]:
    peak = _value(facts, _PEAK_KEY[precision]) * 1e12
    if precision == "int8":
        eff *= float(a["int8_compute_efficiency_vs_fp16"]["value"])
    compute = 2 * macs / (eff * peak)
    act_bytes = float(a["activation_bytes"]["value"].get(precision, 4))
    moved = weight_params * PRECISION[precision].bytes_per_param + act_elems * act_bytes
    memory = moved / (float(a["bandwidth_efficiency"]["value"]) * _value(facts, "memory_bandwidth_gbs") * 1e9)
    floor = kernels * _value(facts, "kernel_floor_us") * 1e-6
    return max(compute, memory) + floor, {"compute_ms": compute * 1e3, "memory_ms": memory * 1e3,
                                           "kernel_floor_ms": floor * 1e3, "bytes_moved": moved}


def estimate_entry(name: str, spec: ViTSpec, precision: str, batch: int = 1, *,
                   sheets: dict[str, Any] | None = None, macs: tuple[int, int] | None = None,
                   calibration: dict[str, Any] | None = None, floor: dict[str, Any] | None = None,
                   depths: Sequence[int] = ESTIMATE_DEPTHS) -> Entry:
    """The roofline-estimated entry of device ``name`` for one (spec, precision, batch)."""
    from tleg_deploy.plan import costs

    sheets = sheets or load_datasheets()
    dev = sheets["devices"][name]
    a = sheets["assumptions"]
    cal = calibration or calibrate_efficiency(sheets)
    facts = device_facts(name, sheets, floor)
    block_macs, fixed_macs = macs or fvcore_macs(spec, batch)
    d = spec.embed_dim
    (t_block, block_parts), (t_fixed, fixed_parts) = _block_and_fixed(
        spec, precision, batch, facts, a, cal["value"], (block_macs, fixed_macs))
    p90 = float(a["p90_over_p50"]["value"])
    live = batch * spec.num_tokens * max(3 * d + d, spec.mlp_hidden + d) * 2 * 2  # two largest live fp16 tensors
    workspace = float(a["workspace_mb"]["value"])
    points = []
    for depth in depths:
        t_ms = (t_fixed + depth * t_block) * 1e3
        mem = costs.artifact_bytes(spec, depth, precision) / 1e6 + live / 1e6 + workspace
        points.append(Point(depth=depth, p50_ms=t_ms, p90_ms=t_ms * p90, p99_ms=t_ms * p90 * 1.05, mean_ms=t_ms,
                            std_ms=0.0, n=0, rounds=0, p50_se_ms=0.0, p90_se_ms=0.0, memory_mb=mem))
    basis = {
        "method": "roofline: max(compute, memory) + kernels x floor, per block and for the fixed part",
        "macs_per_block": block_macs, "macs_fixed": fixed_macs, "macs_counter": "fvcore + SDPA handle",
        "block": block_parts, "fixed": fixed_parts,
        "compute_efficiency": {"value": cal["value"], "source": cal["source"], "method": cal["method"]},
        "assumptions": {k: v for k, v in a.items()},
        "kernel_floor_us": facts["kernel_floor_us"],
        "uncertainty": {"value": dev["uncertainty"],
                        "source": dev.get("uncertainty_source", "assumption: roofline error band for this device")},
    }
    unc = float(dev["uncertainty"])
    return make_entry(spec, precision, batch, points, latency_rel_floor=unc, memory_rel_floor=0.25, basis=basis)


def estimate_profile(name: str, *, specs: Sequence[str] = SHIPPED_SPECS,
                     precisions: Sequence[str] = SHIPPED_PRECISIONS, batch: int = 1,
                     sheets: dict[str, Any] | None = None, date: str = "") -> DeviceProfile:
    """A ``source="estimated"`` TensorRT profile of a datasheet device for the given specs."""
    sheets = sheets or load_datasheets()
    dev = sheets["devices"][name]
    cal = calibrate_efficiency(sheets)
    floor = calibrate_kernel_floor(sheets, cal) if "floor_calibration" in sheets else None
    entries = []
    for spec_name in specs:
        spec = ViTSpec.preset(spec_name)
        macs = fvcore_macs(spec, batch)
        entries += [estimate_entry(name, spec, p, batch, sheets=sheets, macs=macs, calibration=cal, floor=floor)
                    for p in precisions]
    return DeviceProfile(
        name=name, aliases=tuple(dev["aliases"]), source="estimated", kind=dev["kind"], backend="tensorrt",
        measure_command=(f"tleg-deploy profile --device {name} --backend tensorrt --precision "
                         f"{','.join(precisions)} --spec {','.join(specs)} --batch {batch} -o profiles/{name}.json"),
        entries=tuple(entries), hardware=device_facts(name, sheets, floor),
        runtime={"precisions": list(precisions), "batch": batch, "engine": "TensorRT (estimated, not measured)"},
        environment={}, host_fingerprint=None, date=date,
        notes=("Estimated from datasheet figures with a roofline calibrated on a public measurement; "
               "a profile measured on the device replaces it (put it in ./profiles or $TLEG_DEPLOY_PROFILES)."),
    )


def write_shipped_profiles(out_dir: Path = PROFILES_DIR) -> list[Path]:
    import datetime as dt

    sheets = load_datasheets()
    date = dt.date.today().isoformat()
    return [estimate_profile(name, sheets=sheets, date=date).save(out_dir / f"{name}.json")
            for name in sheets["devices"]]


if __name__ == "__main__":
    for path in write_shipped_profiles():
        print(f"wrote {path}")
