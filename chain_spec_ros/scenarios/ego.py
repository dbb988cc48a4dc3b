"""Ego kinematics: IDM longitudinal control along the route plus a planned lateral offset."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .actors import Obstacle
from .road import Route

EGO_HALF_LENGTH = 2.4
SIM_DT = 0.02  # 50 Hz, the odometry rate of the recorded bags


@dataclass
class LateralPlan:
    """Lateral offset (left positive) as smooth cosine ramps: (start time, duration, delta)."""

    start_offset: float
    ramps: list[tuple[float, float, float]] = field(default_factory=list)

    def offset(self, t: float) -> float:
        value = self.start_offset
        for start, duration, delta in self.ramps:
            progress = np.clip((t - start) / duration, 0.0, 1.0)
            value += delta * 0.5 * (1 - np.cos(np.pi * progress))
        return float(value)


@dataclass
class SpeedZone:
    """A speed cap between two arc lengths (curves, turns); the ego brakes ahead of it."""

    s_from: float
    s_to: float
    v_max: float
    active_from: float = -1e9  # the ego notices the zone (sees the curve, sign, turn) at this time


@dataclass
class EgoPlan:
    cruise_speed: float
    lateral: LateralPlan
    obstacles: list[Obstacle] = field(default_factory=list)
    zones: list[SpeedZone] = field(default_factory=list)
    max_accel: float = 1.6
    comfort_decel: float = 2.2
    time_headway: float = 1.3
    min_gap: float = 2.5
    cruise_change_at: float = 1e9  # time at which cruise_speed switches to resume_speed
    resume_speed: float = 0.0

    def desired_speed(self, t: float, s: float) -> float:
        """Cruise speed, capped so the ego can brake comfortably into every zone ahead."""
        speed = self.resume_speed if t >= self.cruise_change_at else self.cruise_speed
        for zone in self.zones:
            if s >= zone.s_to or t < zone.active_from:
                continue
            distance = max(zone.s_from - s, 0.0)
            speed = min(speed, np.sqrt(zone.v_max**2 + 2 * 0.8 * self.comfort_decel * distance))
        return max(speed, 0.1)


@dataclass
class EgoTrack:
    """The ego's state sampled at SIM_DT: time, arc length, speed, offset and world pose."""

    t: np.ndarray
    s: np.ndarray
    v: np.ndarray
    offset: np.ndarray
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray

    def index(self, t: float) -> int:
        return int(round((t - self.t[0]) / SIM_DT))

    def pose(self, t: float) -> tuple[float, float, float]:
        i = self.index(t)
        return float(self.x[i]), float(self.y[i]), float(self.yaw[i])


def idm_accel(plan: EgoPlan, t: float, s: float, v: float) -> float:
    """Intelligent Driver Model towards the desired speed and the nearest active obstacle."""
    desired = plan.desired_speed(t, s)
    accel = plan.max_accel * (1 - (v / desired) ** 4)
    for obstacle in plan.obstacles:
        if not obstacle.active(t):
            continue
        obstacle_s, obstacle_v = obstacle.motion.s_and_speed(t)
        gap = obstacle_s - s - EGO_HALF_LENGTH - obstacle.standoff
        if gap < -1.0:  # already behind us
            continue
        gap = max(gap, 0.1)
        wanted = plan.min_gap + v * plan.time_headway + v * (v - obstacle_v) / (
            2 * np.sqrt(plan.max_accel * plan.comfort_decel)
        )
        accel = min(accel, plan.max_accel * (1 - (v / desired) ** 4 - (max(wanted, 0.0) / gap) ** 2))
    return float(np.clip(accel, -7.0, plan.max_accel))


def simulate_ego(route: Route, plan: EgoPlan, s0: float, v0: float, t_end: float) -> EgoTrack:
    times = np.arange(0.0, t_end + 1e-9, SIM_DT)
    s = np.empty_like(times)
    v = np.empty_like(times)
    s[0], v[0] = s0, v0
    for i in range(len(times) - 1):
        accel = idm_accel(plan, times[i], s[i], v[i])
        v[i + 1] = max(v[i] + accel * SIM_DT, 0.0)
        s[i + 1] = s[i] + 0.5 * (v[i] + v[i + 1]) * SIM_DT
    offset = np.array([plan.lateral.offset(t) for t in times])
    x, y, heading = route.pose(s, offset)
    # Heading follows the path actually driven, so lane changes show up as yaw.
    d_offset = np.gradient(offset, SIM_DT)
    yaw = heading + np.arctan2(d_offset, np.maximum(v, 0.5))
    return EgoTrack(times, s, v, offset, x, y, yaw)
