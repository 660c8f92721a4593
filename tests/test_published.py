"""The shipped estimated profiles held to public TensorRT timings (``tleg_deploy/data/published_timings.json``).

Reads the JSON and the shipped profiles only; no network. A point taken in the setting a profile
predicts must fall inside the shipped interval of its device; points outside it carry a reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tleg_deploy.errors import FormatError
from tleg_deploy.model.spec import ViTSpec
from tleg_deploy.profile.estimate import PUBLISHED, load_datasheets, load_published, published_spec
from tleg_deploy.profile.registry import SHIPPED_DIR
from tleg_deploy.profile.table import DeviceProfile


def _interval(prof: DeviceProfile, spec: ViTSpec, precision: str, batch: int, depth: int) -> tuple[float, float]:
    fit = prof.entry(spec, precision, batch).fit.latency_p50
    return fit.value(depth) - fit.half_width(depth), fit.upper(depth)


def _independent_points() -> list[dict]:
    """In-setting points other than the one the kernel floor is calibrated on: only these can test the
    estimate (the calibration point is matched by construction; today it is the only in-setting point,
    so the coverage checks below hold nothing to account until another public timing is added)."""
    calibration = load_datasheets()["floor_calibration"]["point"]
    return [p for p in load_published() if p["in_setting"] and p["id"] != calibration]


def test_published_points_are_sourced_and_independent_ones_are_covered_by_the_shipped_profiles() -> None:
    points = load_published()
    assert any(p["in_setting"] for p in points), "nothing to hold the estimates to"
    for p in points:
        assert p["source"]["url"].startswith("https://") and p["source"]["where"].strip(), p["id"]
        assert (SHIPPED_DIR / f"{p['device']}.json").is_file(), p["id"]
    for p in _independent_points():
        assert p["nearest_preset"], f"{p['id']}: an in-setting point names the shipped spec it is checked on"
        prof = DeviceProfile.load(SHIPPED_DIR / f"{p['device']}.json")
        lo, hi = _interval(prof, ViTSpec.preset(p["nearest_preset"]), p["precision"], p["batch"], p["depth"])
        assert lo <= p["latency_ms"] <= hi, (p["id"], lo, p["latency_ms"], hi)


def test_the_kernel_floor_is_calibrated_on_an_in_setting_point_and_shipped() -> None:
    sheets = load_datasheets()
    fc = sheets["floor_calibration"]
    point = next(p for p in load_published() if p["id"] == fc["point"])
    assert point["in_setting"] and point["device"] == fc["device"]
    for name, dev in sheets["devices"].items():
        shipped = DeviceProfile.load(SHIPPED_DIR / f"{name}.json").hardware["kernel_floor_us"]
        assert isinstance(shipped["value"], float) and math.isfinite(shipped["value"]) and shipped["value"] > 0
        if dev["facts"]["kernel_floor_us"]["value"] == "calibrated":  # regenerated after the calibration
            assert fc["point"] in shipped["source"], name


@pytest.mark.slow
def test_the_estimate_of_each_points_own_architecture_reproduces_or_covers_it() -> None:
    """The point's exact shape (class token, head size) through the estimator, not the nearest preset."""
    from tleg_deploy.profile.estimate import estimate_entry

    calibration = load_datasheets()["floor_calibration"]["point"]
    for p in load_published():
        if not p["in_setting"]:
            continue
        entry = estimate_entry(p["device"], published_spec(p), p["precision"], p["batch"])
        fit = entry.fit.latency_p50
        if p["id"] == calibration:  # a consistency check: the calibration reproduces its own point
            assert fit.value(p["depth"]) == pytest.approx(p["latency_ms"], rel=0.01), p["id"]
        else:
            assert fit.value(p["depth"]) - fit.half_width(p["depth"]) <= p["latency_ms"] <= fit.upper(p["depth"]), \
                p["id"]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["points"][0].update(latency_ms=float("nan")), "finite latency_ms"),
    (lambda d: d["points"][0].pop("source"), "lacks"),
    (lambda d: d["points"][0].update(in_setting=False, excluded_because=None), "without a reason"),
    (lambda d: d.update(schema_version=2), "schema_version 1"),
])
def test_a_bad_published_file_is_refused(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    data = json.loads(PUBLISHED.read_text(encoding="utf-8"))
    edit(data)
    bad = tmp_path / "published.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(FormatError, match=message):
        load_published(bad)
