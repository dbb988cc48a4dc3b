"""Trajectory metrics shared by the evaluation, the replay report and the benchmarks."""
from __future__ import annotations

import numpy as np

from .constants import HORIZONS_S
from .trajectory import STEP_SECONDS


def displacement_errors(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """ADE and FDE at each horizon of HORIZONS_S for one trajectory pair [T, 2] (a horizon past
    the end of a shorter pair is cut to its length)."""
    errors = np.linalg.norm(np.asarray(predicted) - np.asarray(truth), axis=-1)
    out = {}
    for horizon in HORIZONS_S:
        n = min(int(round(horizon / STEP_SECONDS)), len(errors))
        out[f"ade_{horizon:g}s"] = float(errors[:n].mean())
        out[f"fde_{horizon:g}s"] = float(errors[n - 1])
    return out


def constant_velocity(speed: float, steps: int = 64) -> np.ndarray:
    """The baseline: keep the current speed and heading."""
    x = speed * STEP_SECONDS * np.arange(1, steps + 1)
    return np.stack([x, np.zeros_like(x)], axis=1)
