"""Ego-motion encodings shared by the simulator, the dataset and the ROS node.

History: poses at 10 Hz in the t0 vehicle frame (x forward, y left, z up), tokenised as
Alpamayo-R1's DeltaTrajectoryTokenizer does: the last 16 poses (t0-1.5 s .. t0), a zero point
put in front, their deltas (so the first "delta" is the oldest pose itself, relative to t0, and
usually clamps), each axis rounded into 1000 bins over +-4 m (x, y) and +-10 m (z): 48 tokens.
Future: 64 steps at 10 Hz as (acceleration, curvature) pairs, integrated by a unicycle.
"""
from __future__ import annotations

import numpy as np

HISTORY_STEPS = 16
FUTURE_STEPS = 64
STEP_SECONDS = 0.1
HISTORY_SECONDS = HISTORY_STEPS * STEP_SECONDS  # 1.6 s: 17 poses t0-1.6 s .. t0
HISTORY_TOKENS = 3 * HISTORY_STEPS  # (dx, dy, dz) per step: 48
NUM_BINS = 1000
DELTA_RANGE = 4.0  # metres: history bins cover [-4, 4] in x and y
HISTORY_RANGES = np.array([DELTA_RANGE, DELTA_RANGE, 10.0])  # x, y, z (Alpamayo's ego_xyz_min / max)
ACCEL_RANGE = 8.0  # m/s^2, for the discrete future tokens of the language stage
CURVATURE_RANGE = 0.2  # 1/m
# Below this speed the ego is at rest: a 0.1 s history step under 2 cm (2.5 bins of
# DELTA_RANGE / NUM_BINS), and the twist a standing car's odometry reports stays under it.
REST_SPEED = 0.2  # m/s


def to_local_frame(xy: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    """World (x, y) points into the frame of the pose `origin` = (x, y, yaw)."""
    ox, oy, yaw = origin
    c, s = np.cos(yaw), np.sin(yaw)
    d = np.asarray(xy, dtype=float) - [ox, oy]
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], axis=-1)


def history_speeds(poses_xyz: np.ndarray) -> np.ndarray:
    """Mean speed of each history step [..., 16] (m/s) from poses [..., 17, 3], oldest first."""
    steps = np.diff(np.asarray(poses_xyz)[..., :2], axis=-2)
    return np.linalg.norm(steps, axis=-1) / STEP_SECONDS


def history_deltas(poses_xyz: np.ndarray) -> np.ndarray:
    """17 local poses (t0-1.6 s .. t0) -> 16 per-step deltas [16, 3]."""
    if poses_xyz.shape != (HISTORY_STEPS + 1, 3):
        raise ValueError(f"expected {HISTORY_STEPS + 1} poses of (x, y, z), got {poses_xyz.shape}")
    return np.diff(poses_xyz, axis=0)


def quantise(values: np.ndarray, value_range: float) -> np.ndarray:
    """Uniform bins over [-range, range); values outside are clamped to the end bins."""
    scaled = (np.asarray(values, dtype=float) + value_range) / (2 * value_range) * NUM_BINS
    return np.clip(np.floor(scaled), 0, NUM_BINS - 1).astype(np.int64)


def dequantise(bins: np.ndarray, value_range: float) -> np.ndarray:
    """Bin centres."""
    return (np.asarray(bins, dtype=float) + 0.5) / NUM_BINS * 2 * value_range - value_range


def history_bins(poses_xyz: np.ndarray) -> np.ndarray:
    """The 48 history bin indices of 17 poses (t0-1.6 s .. t0), ordered (x, y, z) per point,
    oldest first: Alpamayo's delta tokenisation of the last 16 (see the module docstring),
    bin = clamp(round((d + range) / (2 range) * 999), 0, 999)."""
    history_deltas(poses_xyz)  # shape check
    points = np.asarray(poses_xyz, dtype=float)[-HISTORY_STEPS:]
    deltas = np.diff(points, axis=0, prepend=np.zeros((1, 3)))
    scaled = (deltas + HISTORY_RANGES) / (2 * HISTORY_RANGES) * (NUM_BINS - 1)
    return np.clip(np.round(scaled), 0, NUM_BINS - 1).astype(np.int64).reshape(-1)


def history_deltas_from_bins(bins: np.ndarray) -> np.ndarray:
    """Bin indices [48] -> the deltas [16, 3] they stand for (the first one clamped)."""
    return np.asarray(bins, dtype=float).reshape(HISTORY_STEPS, 3) / (NUM_BINS - 1) * 2 * HISTORY_RANGES - HISTORY_RANGES


def future_bins(accel_curvature: np.ndarray, stride: int = 4) -> np.ndarray:
    """Discrete future for the language stage: (accel, curvature) every `stride` steps."""
    subsampled = accel_curvature[stride - 1 :: stride]
    return np.stack([quantise(subsampled[:, 0], ACCEL_RANGE), quantise(subsampled[:, 1], CURVATURE_RANGE)],
                    axis=1).reshape(-1)


def accel_curvature(speed: np.ndarray, yaw: np.ndarray, dt: float = STEP_SECONDS) -> np.ndarray:
    """Per-step (acceleration, curvature) from states sampled at dt, states[0] being t0.

    The pairs are the controls that, integrated by `integrate_unicycle` from speed[0],
    reproduce the sampled speeds exactly and the headings to first order.
    """
    accel = np.diff(speed) / dt
    mean_speed = 0.5 * (speed[1:] + speed[:-1])
    yaw_step = np.angle(np.exp(1j * np.diff(yaw)))
    curvature = np.where(mean_speed > 0.3, yaw_step / np.maximum(mean_speed * dt, 1e-6), 0.0)
    return np.stack([accel, curvature], axis=1)


def integrate_unicycle(accel_curvature_pairs: np.ndarray, speed0: float, dt: float = STEP_SECONDS) -> np.ndarray:
    """(acceleration, curvature) pairs [T, 2] -> [T, 4] of (x, y, yaw, speed) in the t0 frame:
    the expert's unicycle (`models.expert.integrate_unicycle`), in float64 on numpy arrays."""
    # Imported here: sensing, the replay report and the scenarios use this module without torch.
    import torch

    from .models.expert import integrate_unicycle as integrate

    controls = torch.as_tensor(np.asarray(accel_curvature_pairs, dtype=np.float64))
    return torch.stack(integrate(controls[:, 0], controls[:, 1], float(speed0), dt), dim=-1).numpy()
