"""Our roofline estimates against public TensorRT timings of plain ViTs on the shipped devices.

    .venv/bin/python benchmarks/estimate_vs_published.py

For every point of ``tleg_deploy/data/published_timings.json`` (each copied from its named public
source; none measured by us) the estimator computes the point's own architecture — patch size,
width, heads, class token, head size, depth — on the point's device, precision and batch, exactly
as the shipped profiles are made (``tleg_deploy.profile.estimate``). Printed and written to
RESULTS.md: estimate / published, and whether the published number falls inside the estimate's
stated interval (p50 ± the profile's relative uncertainty). Points taken outside the setting a
profile predicts (pipeline FPS, compressed models) are shown with the reason and are not required
to be covered. Writes ``benchmarks/results/estimate_vs_published.{json,md}``; no network.
"""

from __future__ import annotations

import math
import time
from typing import Any

from _results import write_result

from tleg_deploy.profile.estimate import (
    calibrate_efficiency,
    calibrate_kernel_floor,
    estimate_entry,
    load_datasheets,
    load_published,
    published_spec,
)


def compare(point: dict[str, Any], sheets: dict[str, Any], cal: dict[str, Any],
            floor: dict[str, Any]) -> dict[str, Any]:
    """The estimate, its interval and the ratio for one published point."""
    precision = point["precision"] if point["precision"] in ("fp16", "int8", "fp32") else "fp16"
    depth = int(point["depth"])
    entry = estimate_entry(point["device"], published_spec(point), precision, int(point["batch"]), sheets=sheets,
                           calibration=cal, floor=floor)
    fit = entry.fit.latency_p50
    est, half = fit.value(depth), fit.half_width(depth)
    lo, hi = est - half, est + half
    pub = float(point["latency_ms"])
    return {"id": point["id"], "device": point["device"], "model": point["model"], "depth": depth,
            "precision": point["precision"], "precision_estimated": precision, "batch": point["batch"],
            "published_ms": pub, "estimate_ms": est, "lower_ms": lo, "upper_ms": hi, "ratio": est / pub,
            "inside": lo <= pub <= hi, "in_setting": point["in_setting"],
            "excluded_because": point["excluded_because"], "source": point["source"]["url"],
            "tensorrt": point["tensorrt"], "power_mode": point["power_mode"]}


def main() -> None:
    start = time.perf_counter()
    sheets = load_datasheets()
    cal = calibrate_efficiency(sheets)
    floor = calibrate_kernel_floor(sheets, cal)
    rows = [compare(p, sheets, cal, floor) for p in load_published()]
    for r in rows:
        print(f"{r['id']}: estimate {r['estimate_ms']:.3f} ms [{r['lower_ms']:.3f}, {r['upper_ms']:.3f}] vs published "
              f"{r['published_ms']:.3f} ms -> {r['ratio']:.2f}x, {'inside' if r['inside'] else 'OUTSIDE'}"
              + ("" if r["in_setting"] else f" (out of setting: {r['excluded_because']})"))
    checked = [r for r in rows if r["in_setting"]]
    covered = sum(r["inside"] for r in checked)
    geo = math.exp(sum(math.log(r["ratio"]) for r in rows) / len(rows))
    devices = sorted({r["device"] for r in rows})
    summary = (f"{len(rows)} public points on {len(devices)} devices ({', '.join(devices)}); "
               f"{len(checked)} in setting, "
               f"{covered}/{len(checked)} of them inside the stated interval; all points inside: "
               f"{sum(r['inside'] for r in rows)}/{len(rows)}; geometric mean of estimate/published {geo:.2f}.")
    print(summary)
    lines = ["## Estimate vs published", "",
             "`benchmarks/estimate_vs_published.py`: the roofline estimate (`tleg_deploy/profile/estimate.py`, as the "
             "shipped profiles are made) of each public TensorRT timing in `tleg_deploy/data/published_timings.json`, "
             "for that point's own architecture, device, precision and batch. The interval is the profile's stated "
             "one (p50 ± its relative uncertainty). The published numbers were copied from their sources, not "
             "measured here.", "",
             f"Kernel floor calibrated on `{floor['point']}`: {floor['value']:.1f} µs per kernel at "
             f"{floor['clock_mhz']:g} MHz (scaled by GPU clock on the other Jetsons). That point is therefore matched "
             "by construction; with one in-setting point there is no independent check yet.", "",
             summary, "",
             "| point | device | precision | batch | published | estimate | interval | est/pub | inside | setting |",
             "|---|---|---|---:|---:|---:|---|---:|---|---|"]
    lines += [f"| [{r['id']}]({r['source']}) | {r['device']} | {r['precision_estimated']} | {r['batch']} "
              f"| {r['published_ms']:.2f} ms | {r['estimate_ms']:.2f} ms | {r['lower_ms']:.2f}-{r['upper_ms']:.2f} ms "
              f"| {r['ratio']:.2f} | {'yes' if r['inside'] else '**no**'} "
              f"| {'in' if r['in_setting'] else 'out: ' + str(r['excluded_because'])} |" for r in rows]
    lines += ["", "Not found (so not held to anything): any public batch-1 TensorRT ViT/DeiT timing on Jetson Orin NX "
              "or H100; see `not_used` in the JSON for the numbers seen and why they were left out."]
    write_result("estimate_vs_published", {"rows": rows, "kernel_floor": floor,
                                           "compute_efficiency": cal["value"], "covered_in_setting": covered,
                                           "in_setting": len(checked), "wall_seconds": time.perf_counter() - start},
                 "\n".join(lines))


if __name__ == "__main__":
    main()
