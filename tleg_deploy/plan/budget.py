"""``Budget``: the limits a deployment must meet (latency at a percentile, peak memory, params,
MACs, artifact bytes; any subset). Units live in the field names; ``Budget.from_strings`` parses
what users type (``5ms``, ``256MB``, ``20M``) at the CLI edge. Torch-free, stdlib only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tleg_deploy.errors import UnitError

PERCENTILES = ("p50", "p90")

# Constraint name -> (Budget field, unit shown to users, predicted?).
CONSTRAINTS: dict[str, tuple[str, str, bool]] = {
    "latency": ("latency_ms", "ms", True),
    "memory": ("memory_mb", "MB", True),
    "params": ("params", "", False),
    "macs": ("macs", "", False),
    "bytes": ("artifact_bytes", "B", False),
}


def _positive(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UnitError(f"budget {name}={value!r} must be a positive finite number", hint="e.g. latency_ms=5.0")


@dataclass(frozen=True)
class Budget:
    """Limits a deployment must meet; any subset, at least one. Units are in the field names."""

    latency_ms: float | None = None
    percentile: str = "p90"
    memory_mb: float | None = None
    params: int | None = None
    macs: int | None = None
    artifact_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("latency_ms", "memory_mb", "params", "macs", "artifact_bytes"):
            _positive(name, getattr(self, name))
        if self.percentile not in PERCENTILES:
            raise UnitError(f"unknown latency percentile {self.percentile!r}", hint="use p50 or p90")
        if not self.limits():
            raise UnitError("the budget sets no limit", hint="give at least --latency, --memory or --params")

    def limits(self) -> dict[str, float]:
        """The constraints that are set: name -> limit, in the unit of the Budget field."""
        out: dict[str, float] = {}
        for name, (attr, _, _) in CONSTRAINTS.items():
            value = getattr(self, attr)
            if value is not None:
                out[name] = float(value)
        return out

    def describe(self) -> str:
        parts = [format_limit(name, value) for name, value in self.limits().items()]
        if self.latency_ms is not None:
            parts[0] = f"{self.percentile} {parts[0]}"
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "percentile": self.percentile, "memory_mb": self.memory_mb,
                "params": self.params, "macs": self.macs, "artifact_bytes": self.artifact_bytes}

    @classmethod
    def from_strings(
        cls, *, latency: str | None = None, percentile: str = "p90", memory: str | None = None,
        params: str | None = None, macs: str | None = None, artifact: str | None = None,
    ) -> Budget:
        """The CLI edge: ``latency='5ms', memory='256MB', params='20M'``."""
        from tleg_deploy.plan.units import parse_count, parse_latency_ms, parse_percentile, parse_size_mb

        return cls(
            latency_ms=parse_latency_ms(latency) if latency is not None else None,
            percentile=parse_percentile(percentile),
            memory_mb=parse_size_mb(memory) if memory is not None else None,
            params=parse_count(params) if params is not None else None,
            macs=parse_count(macs) if macs is not None else None,
            artifact_bytes=round(parse_size_mb(artifact) * 1e6) if artifact is not None else None,
        )


def format_limit(constraint: str, value: float) -> str:
    if constraint == "latency":
        return f"{value:.3g} ms" if value < 10 else f"{value:.1f} ms"
    if constraint == "memory":
        return f"{value:.4g} MB"
    if constraint == "bytes":
        return f"{value / 1e6:.2f} MB file"
    suffix = " MACs" if constraint == "macs" else " params"
    for div, s in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= div:
            return f"{value / div:.3g}{s}{suffix}"
    return f"{value:.0f}{suffix}"
