"""Parse the quantity strings users type (``5ms``, ``256MB``, ``20M``) into numbers with units in
their names. Only the CLI edge calls these; library code takes ``latency_ms``, ``memory_mb``, ...
``format_metrics`` goes the other way, for metrics shown to people (accuracies as percentages).
Stdlib only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from tleg_deploy.errors import UnitError

_NUMBER = r"(?P<value>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>[A-Za-zµ]*)"

_TIME_MS = {"ms": 1.0, "s": 1000.0, "sec": 1000.0, "us": 1e-3, "µs": 1e-3, "ns": 1e-6}
# Decimal and binary sizes, in megabytes (1 MB = 1e6 bytes).
_SIZE_MB = {
    "b": 1e-6, "kb": 1e-3, "mb": 1.0, "gb": 1e3, "tb": 1e6,
    "kib": 1024 / 1e6, "mib": 1024**2 / 1e6, "gib": 1024**3 / 1e6, "tib": 1024**4 / 1e6,
}
_COUNT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def _split(text: str, what: str, example: str) -> tuple[float, str]:
    match = re.fullmatch(_NUMBER, text.strip())
    if not match:
        raise UnitError(f"cannot read {what} {text!r}", hint=f"write it like {example}")
    value = float(match["value"])
    if not math.isfinite(value) or value <= 0:
        raise UnitError(f"{what} {text!r} must be a positive finite number", hint=f"e.g. {example}")
    return value, match["unit"]


def parse_latency_ms(text: str) -> float:
    """``'5ms'`` -> 5.0, ``'0.5s'`` -> 500.0, ``'800us'`` -> 0.8."""
    value, unit = _split(text, "latency", "5ms, 0.5s or 800us")
    if unit.lower() not in _TIME_MS:
        raise UnitError(f"unknown time unit {unit or '(none)'!r} in {text!r}", hint="use ms, s or us")
    return value * _TIME_MS[unit.lower()]


def parse_size_mb(text: str) -> float:
    """``'256MB'`` -> 256.0, ``'1.5GiB'`` -> 1610.6... (megabytes of 10^6 bytes)."""
    value, unit = _split(text, "size", "256MB or 1.5GiB")
    if unit.lower() not in _SIZE_MB:
        raise UnitError(
            f"unknown size unit {unit or '(none)'!r} in {text!r}", hint="use B, KB, MB, GB, KiB, MiB or GiB"
        )
    return value * _SIZE_MB[unit.lower()]


def parse_count(text: str) -> int:
    """``'20M'`` -> 20_000_000, ``'1.5k'`` -> 1500, ``'300'`` -> 300."""
    value, unit = _split(text, "count", "20M, 1.5k or 300")
    if unit.lower() not in _COUNT:
        raise UnitError(f"unknown count suffix {unit!r} in {text!r}", hint="use k, M or G")
    return round(value * _COUNT[unit.lower()])


def parse_percentile(text: str) -> str:
    """``'p90'``, ``'P90'`` or ``'90'`` -> ``'p90'``; only p50 and p90 are budgeted."""
    norm = text.strip().lower()
    norm = norm if norm.startswith("p") else f"p{norm}"
    if norm not in ("p50", "p90"):
        raise UnitError(f"unknown latency percentile {text!r}", hint="use p50 or p90")
    return norm


def format_metric(key: str, value: Any) -> str:
    """``val_acc 0.229...`` → ``val_acc 22.9%``; seconds to 0.1 s; other floats to 4 significant digits."""
    if isinstance(value, float) and not isinstance(value, bool):
        if key.endswith("acc") or key.endswith("accuracy"):
            return f"{value:.1%}"
        return f"{value:.1f}" if key.endswith("seconds") else f"{value:.4g}"
    return str(value)


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {format_metric(k, v)}" for k, v in metrics.items())
