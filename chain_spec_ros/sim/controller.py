"""Following a plan: pure pursuit for the steering, a speed P-controller for the pedals.

Both are the textbook versions, deliberately plain: what the episode measures should be the
planner's plans, not a clever controller hiding their faults. The plan is fixed in the world at
the instant it was made (its t0 frame), so between ticks the ego keeps following the path it
was given, not a path that moves with the car.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..trajectory import REST_SPEED, STEP_SECONDS, integrate_unicycle
from .geometry import plan_path_in_world
from .vehicle import VehicleState

SPEED_GAIN = 1.5  # 1/s: acceleration per m/s of speed error, on top of the plan's own acceleration
LOOKAHEAD_TIME = 0.8  # s: pure pursuit aims at the path point this far ahead at the current speed
MIN_LOOKAHEAD = 3.0  # m: ... but never closer (at low speed a near target makes steering twitch)
MIN_PATH_LENGTH = 0.5  # m: a plan moving less than this is a plan to stand: keep the steering
HOLD_PREVIEW = 0.5  # s: the brake holds the car only when the plan stays below REST_SPEED this long


@dataclass
class TrackedPlan:
    """A plan as the controller follows it: fixed in the world frame, timed from its t0."""

    t0: float
    path: np.ndarray  # [65, 2] world (x, y) at t0, t0 + 0.1 s, ... t0 + 6.4 s (the ego first)
    speed: np.ndarray  # [65] the plan's speed at the same instants, m/s (never negative)
    accel: np.ndarray  # [64] the plan's acceleration over each 0.1 s step

    @classmethod
    def from_plan(cls, t0: float, origin: tuple[float, float, float], speed0: float,
                  trajectory_xy: np.ndarray, controls: np.ndarray) -> "TrackedPlan":
        """`trajectory_xy` [64, 2] in the t0 frame of `origin` (x, y, yaw) and its (acceleration,
        curvature) `controls` [64, 2], which the expert's unicycle integrates from `speed0`."""
        world = plan_path_in_world(origin, trajectory_xy)
        # The unicycle's speeds: the release does not clamp them, a car does not reverse here.
        speeds = integrate_unicycle(controls, speed0)[:, 3]
        speed = np.maximum(np.concatenate([[speed0], speeds]), 0.0)
        return cls(t0, world, speed, np.asarray(controls, dtype=float)[:, 0])


@dataclass
class Command:
    accel: float  # m/s^2
    curvature: float  # 1/m
    hold: bool  # the plan wants the car standing: let the brake hold it at zero


def track(plan: TrackedPlan, state: VehicleState, t: float) -> Command:
    """The command that follows `plan` from `state` at simulated time t."""
    tau = float(np.clip(t - plan.t0, 0.0, STEP_SECONDS * (len(plan.speed) - 1)))
    times = STEP_SECONDS * np.arange(len(plan.speed))
    v_ref = float(np.interp(tau, times, plan.speed))
    feedforward = float(plan.accel[min(int(tau / STEP_SECONDS), len(plan.accel) - 1)])
    accel = feedforward + SPEED_GAIN * (v_ref - state.v)
    # A plan from standstill starts at speed 0: hold the car only if it also wants to stay
    # (nearly) still for the next HOLD_PREVIEW, else it could never set off.
    preview = times[(times >= tau) & (times <= tau + HOLD_PREVIEW)]
    hold = max(v_ref, float(np.interp(preview, times, plan.speed).max(initial=0.0))) < REST_SPEED
    if hold:  # standing: brake towards zero whatever the feedforward says
        accel = min(accel, -SPEED_GAIN * state.v)
    return Command(accel, pure_pursuit(plan.path, state), hold)


def pure_pursuit(path: np.ndarray, state: VehicleState) -> float:
    """Curvature of the circle through the ego (tangent to its heading) and the path point one
    lookahead distance ahead: kappa = 2 * lateral / distance^2 in the ego frame."""
    steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
    if steps.sum() < MIN_PATH_LENGTH:
        return state.curvature
    lookahead = max(MIN_LOOKAHEAD, LOOKAHEAD_TIME * state.v)
    position = np.array([state.x, state.y])
    distances = np.linalg.norm(path - position, axis=1)
    nearest = int(distances.argmin())
    beyond = np.nonzero(distances[nearest:] >= lookahead)[0]
    if len(beyond):
        target = path[nearest + beyond[0]]
    else:  # the path ends inside the lookahead: extend its last moving segment straight on
        moving = np.nonzero(steps > 1e-3)[0]
        last = int(moving[-1]) if len(moving) else len(steps) - 1
        direction = (path[last + 1] - path[last]) / max(steps[last], 1e-9)
        target = path[-1] + direction * max(lookahead - distances[-1], 0.0)
    dx, dy = target - position
    c, s = np.cos(state.yaw), np.sin(state.yaw)
    forward, left = c * dx + s * dy, -s * dx + c * dy
    distance_sq = forward * forward + left * left
    if distance_sq < 1e-6:
        return state.curvature
    return float(2.0 * left / distance_sq)
