"""Device profiles: measure a backend on this machine, estimate one we cannot reach, fit the
``intercept + slope·depth`` cost model and predict any depth (DESIGN.md §3, §6).

``table`` and ``registry`` are torch-free; ``measure`` and ``estimate`` import torch /
onnxruntime inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from tleg_deploy.profile.linefit import LinearFit, fit_line
from tleg_deploy.profile.table import DeviceProfile, Prediction

__all__ = ["DeviceProfile", "LinearFit", "Prediction", "fit_line", "list_profiles", "profile", "resolve_profile"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import tleg_deploy.profile` stays torch-free and cheap.
    if name in ("resolve_profile", "list_profiles"):
        from tleg_deploy.profile import registry

        return getattr(registry, name)
    if name == "profile":
        from tleg_deploy.profile.measure import profile

        return profile
    raise AttributeError(f"module 'tleg_deploy.profile' has no attribute {name!r}")
