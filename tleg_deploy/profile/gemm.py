"""The physical limit: this machine's 1-thread GEMM throughput (MAC/s) for fp32 and int8, and an
exported model's latency as a fraction of its *MAC floor* at that throughput.

``measure_gemm`` builds two one-node ONNX graphs of a ViT-shaped matrix multiply (``tokens×dim @
dim×hidden``, by default ViT-S/16's fc1: 197×384 @ 384×1536): an fp32 ``MatMul`` and an int8
``MatMulInteger`` (uint8 activations × int8 weights, the u8s8 form ONNX Runtime's VNNI/AMX kernels
run), and times both with ONNX Runtime at 1 intra-op thread, interleaved (``timing.time_runners``),
in about a second. ``MAC/s = tokens·dim·hidden / p50``.

The figures are stored as facts of the measured profile's ``device.hardware`` (``gemm_fp32_macs_1t``,
``gemm_int8_macs_1t``, unit ``MAC/s``), so profiles without them load unchanged. ``mac_floor`` turns
them into ``floor_ms = MACs(spec, depth) / (rate × threads)`` and ``fraction = floor_ms / measured_ms``:
1.0 would be a model that does nothing but GEMM at the machine's peak; the rest is the gap to close.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tleg_deploy.errors import BackendError

__all__ = ["GEMM_KEYS", "GemmRate", "MacFloor", "gemm_facts", "mac_floor", "measure_gemm"]

GEMM_KEYS = {"fp32": "gemm_fp32_macs_1t", "int8": "gemm_int8_macs_1t"}
DEFAULT_SHAPE = (197, 384, 1536)  # ViT-S/16 fc1: tokens × dim @ dim × 4·dim


@dataclass(frozen=True)
class GemmRate:
    """Measured 1-thread GEMM throughput on this machine."""

    fp32_macs: float   # MAC/s
    int8_macs: float   # MAC/s
    shape: tuple[int, int, int]  # (tokens, dim, hidden)
    runs: int          # timed calls per precision


@dataclass(frozen=True)
class MacFloor:
    """A latency's MAC floor: the time the model's MACs take at the machine's GEMM rate."""

    macs: int
    rate_macs: float   # MAC/s used: the 1-thread rate × threads
    floor_ms: float
    measured_ms: float

    @property
    def fraction(self) -> float:
        return self.floor_ms / self.measured_ms

    def describe(self) -> str:
        return (f"MAC floor {self.floor_ms:.3g} ms = {self.fraction:.1%} of the measured {self.measured_ms:.3g} ms "
                f"({self.macs:,} MACs at {self.rate_macs / 1e9:.3g} GMAC/s)")


def _session(model: Any) -> Any:
    """The profiler's own session options (``runners.ort_session``), so the rate is timed as the points are."""
    from tleg_deploy.profile.runners import ort_session

    return ort_session(model.SerializeToString(), threads=1, device="cpu")


def _graphs(tokens: int, dim: int, hidden: int) -> tuple[Any, Any]:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w32 = numpy_helper.from_array(rng.standard_normal((dim, hidden), dtype=np.float32) * 0.02, "W")
    fp32 = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "gemm_fp32",
                             [helper.make_tensor_value_info("A", TensorProto.FLOAT, [tokens, dim])],
                             [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [tokens, hidden])], [w32])
    w8 = numpy_helper.from_array(rng.integers(-127, 128, (dim, hidden), dtype=np.int8), "W")
    int8 = helper.make_graph([helper.make_node("MatMulInteger", ["A", "W"], ["Y"])], "gemm_int8",
                             [helper.make_tensor_value_info("A", TensorProto.UINT8, [tokens, dim])],
                             [helper.make_tensor_value_info("Y", TensorProto.INT32, [tokens, hidden])], [w8])
    opset = [helper.make_opsetid("", 17)]
    return (helper.make_model(fp32, opset_imports=opset, ir_version=8),
            helper.make_model(int8, opset_imports=opset, ir_version=8))


def measure_gemm(shape: tuple[int, int, int] = DEFAULT_SHAPE, *, round_seconds: float = 0.05,
                 rounds: int = 5) -> GemmRate:
    """Time ``tokens×dim @ dim×hidden`` in fp32 and int8 with ONNX Runtime at 1 thread (interleaved
    rounds after a warm-up); MAC/s from the p50. Raises ``BackendError`` without ONNX Runtime or on a
    non-finite result."""
    try:
        import numpy as np
    except ImportError as e:  # pragma: no cover - numpy comes with the package
        raise BackendError("numpy is not installed", hint="pip install numpy") from e
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise BackendError("onnxruntime is not installed", hint="pip install onnxruntime") from e
    from tleg_deploy.profile.config import MeasureConfig
    from tleg_deploy.profile.timing import time_runners

    tokens, dim, hidden = shape
    g32, g8 = _graphs(tokens, dim, hidden)
    s32, s8 = _session(g32), _session(g8)
    rng = np.random.default_rng(1)
    feeds = {0: (s32, {"A": rng.standard_normal((tokens, dim), dtype=np.float32)}),
             1: (s8, {"A": rng.integers(0, 256, (tokens, dim), dtype=np.uint8)})}

    def runner(key: int) -> Any:
        sess, feed = feeds[key]

        def run() -> float:
            t0 = time.perf_counter()
            sess.run(None, feed)
            return (time.perf_counter() - t0) * 1e3
        return run

    cfg = MeasureConfig(warmup=3, rounds=rounds, round_seconds=round_seconds, extra_rounds=0, min_reps=3,
                        max_reps=200, probe=False, memory=False)
    stats = time_runners({0: runner(0), 1: runner(1)}, cfg)
    macs = tokens * dim * hidden
    rates = [macs / (stats[k]["p50"] / 1e3) if stats[k]["p50"] > 0 else math.inf for k in (0, 1)]
    if not all(math.isfinite(r) and r > 0 for r in rates):
        raise BackendError(f"GEMM timing gave a non-finite throughput ({rates})",
                           hint="the timer may be too coarse on this machine")
    return GemmRate(fp32_macs=rates[0], int8_macs=rates[1], shape=shape, runs=int(stats[0]["n"]))


def gemm_facts(rate: GemmRate) -> dict[str, dict[str, Any]]:
    """``device.hardware`` facts of a measured rate (``{value, unit, source}``)."""
    t, d, h = rate.shape
    how = f"measured: ONNX Runtime, 1 thread, {{op}} {t}x{d} @ {d}x{h}, p50 of {rate.runs} calls"
    return {GEMM_KEYS["fp32"]: {"value": rate.fp32_macs, "unit": "MAC/s", "source": how.format(op="MatMul fp32")},
            GEMM_KEYS["int8"]: {"value": rate.int8_macs, "unit": "MAC/s",
                                "source": how.format(op="MatMulInteger u8s8")}}


def _rate(hardware: Mapping[str, Any], precision: str) -> float | None:
    """The profile's 1-thread GEMM rate for ``precision`` (int8 kinds: int8; others: fp32), if recorded."""
    fact = hardware.get(GEMM_KEYS["int8" if precision.startswith("int8") else "fp32"])
    value = fact.get("value") if isinstance(fact, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def mac_floor(hardware: Mapping[str, Any], macs: int, precision: str, measured_ms: float,
              threads: int = 1) -> MacFloor | None:
    """The MAC floor of a measured latency, or ``None`` when the profile has no GEMM rate (older
    profiles) or the measurement is not a positive finite number. ``threads`` scales the 1-thread
    rate linearly (an optimistic floor)."""
    rate = _rate(hardware, precision)
    if rate is None or not math.isfinite(measured_ms) or measured_ms <= 0 or macs <= 0:
        return None
    total = rate * max(threads, 1)
    return MacFloor(macs=macs, rate_macs=total, floor_ms=macs / total * 1e3, measured_ms=measured_ms)
