"""Things in the world besides the road: vehicles, people, lights, signs and their motion."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .road import Route

# BGR colours (OpenCV order), named so the CoC can mention them.
VEHICLE_COLOURS = {
    "red": (40, 40, 200),
    "blue": (190, 90, 30),
    "white": (235, 235, 235),
    "black": (35, 35, 35),
    "silver": (170, 170, 170),
    "yellow": (40, 210, 230),
}
LIGHT_COLOURS = {"red": (30, 30, 255), "yellow": (20, 220, 255), "green": (60, 230, 40)}


@dataclass
class RouteMotion:
    """Moves along the route at lateral `offset`.

    Constant `speed` before `t_start` (so s(t_start) = s0), then constant `accel` from there;
    the speed never goes negative.
    """

    route: Route
    s0: float
    speed: float = 0.0
    accel: float = 0.0
    offset: float = 0.0
    t_start: float = 0.0

    def s_and_speed(self, t: float) -> tuple[float, float]:
        tau = t - self.t_start
        if tau < 0:
            return self.s0 + self.speed * tau, self.speed
        if self.accel < 0 and self.speed > 0:
            tau = min(tau, self.speed / -self.accel)  # comes to rest, does not reverse
        return self.s0 + self.speed * tau + 0.5 * self.accel * tau**2, max(self.speed + self.accel * tau, 0.0)

    def pose(self, t: float) -> tuple[float, float, float]:
        s, _ = self.s_and_speed(t)
        x, y, heading = self.route.pose(s, self.offset)
        return float(x), float(y), float(heading)


@dataclass
class LinearMotion:
    """Walks in a straight line from `start` at `velocity` (m/s, world frame) between two times."""

    start: tuple[float, float]
    velocity: tuple[float, float]
    t_start: float = 0.0
    t_stop: float = 1e9

    def pose(self, t: float) -> tuple[float, float, float]:
        tau = min(max(t - self.t_start, 0.0), self.t_stop - self.t_start)
        x = self.start[0] + self.velocity[0] * tau
        y = self.start[1] + self.velocity[1] * tau
        return x, y, float(np.arctan2(self.velocity[1], self.velocity[0]))


@dataclass
class Actor:
    """A box-shaped object; `kind` decides how the renderer draws it."""

    kind: str  # car, truck, pedestrian, cyclist, cone, traffic_light, stop_sign, route_sign, warning_sign, lane_end_sign
    motion: RouteMotion | LinearMotion
    size: tuple[float, float, float]  # length, width, height in metres
    colour: tuple[int, int, int] = (128, 128, 128)
    light_schedule: list[tuple[float, str]] = field(default_factory=list)  # (from time, colour)
    arrow: str = ""  # route_sign / warning_sign direction: "left" or "right"

    def light(self, t: float) -> str:
        state = self.light_schedule[0][1] if self.light_schedule else ""
        for start, colour in self.light_schedule:
            if t >= start:
                state = colour
        return state


@dataclass
class Obstacle:
    """Something the ego's longitudinal controller must not pass while active.

    `s_at(t)` and `speed_at(t)` give its position along the route and its speed; an
    obstacle outside the ego's lane is simply not listed.
    """

    motion: RouteMotion
    active_from: float = -1e9
    active_until: float = 1e9
    standoff: float = 0.0  # extra stopping margin (stop lines sit before the light)

    def active(self, t: float) -> bool:
        return self.active_from <= t < self.active_until
