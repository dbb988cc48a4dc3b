"""The ego's motion model: a kinematic unicycle (speed and path curvature) with actuator limits.

A kinematic bicycle at these speeds is the same model with curvature = tan(steer) / wheelbase;
we command curvature directly, as the planner's expert does (its trajectories are (acceleration,
curvature) pairs integrated by a unicycle). The limits keep a wild plan from teleporting the
car: the metrics should see what a real car would have done with it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..scenarios.ego import EGO_HALF_LENGTH
from ..trajectory import REST_SPEED

EGO_LENGTH = 2 * EGO_HALF_LENGTH  # 4.8 m, the box the world's IDM keeps its gaps with
EGO_WIDTH = 1.9  # m, as the world's cars
MAX_ACCEL = 3.0  # m/s^2
MAX_BRAKE = -8.0  # m/s^2, an emergency stop
MAX_CURVATURE = 0.2  # 1/m: a 5 m turning radius
MAX_CURVATURE_RATE = 0.5  # 1/m per s: how fast the steering can turn


@dataclass
class VehicleState:
    x: float
    y: float
    yaw: float
    v: float  # m/s, never negative (no reversing)
    curvature: float = 0.0  # 1/m, the steering's current setting

    @property
    def pose(self) -> tuple[float, float, float]:
        return self.x, self.y, self.yaw


def step(state: VehicleState, accel: float, curvature: float, dt: float, hold: bool = False
         ) -> tuple[VehicleState, float]:
    """The state after dt under the commanded acceleration and curvature, and the acceleration
    actually applied.

    Midpoint integration (the speed and heading halfway through the step) keeps arcs round at
    50 Hz. `hold`: the controller asks to stand still; below REST_SPEED the brake then holds the
    car at exactly zero, as the world's own ego stands exactly still (a history of exact zeros,
    which is what the planner was trained on for a car at rest).
    """
    accel = float(np.clip(accel, MAX_BRAKE, MAX_ACCEL))
    max_change = MAX_CURVATURE_RATE * dt
    kappa = float(np.clip(np.clip(curvature, -MAX_CURVATURE, MAX_CURVATURE),
                          state.curvature - max_change, state.curvature + max_change))
    v_next = max(state.v + accel * dt, 0.0)
    if hold and v_next < REST_SPEED:
        v_next = 0.0
    applied = (v_next - state.v) / dt
    v_mid = 0.5 * (state.v + v_next)
    yaw_mid = state.yaw + 0.5 * kappa * v_mid * dt
    return VehicleState(
        x=state.x + v_mid * np.cos(yaw_mid) * dt,
        y=state.y + v_mid * np.sin(yaw_mid) * dt,
        yaw=state.yaw + kappa * v_mid * dt,
        v=v_next,
        curvature=kappa,
    ), applied

