"""The scenario catalogue: each builder sets up a road, the actors and the ego's response.

A builder decides the ground-truth driving decision by construction and makes the ego
behave accordingly, so the decision always agrees with the future motion. Causes (lights,
people, obstacles, signs) are placed so that they are visible in the camera frames at t0,
while the ego's reaction starts at most a few tenths of a second before t0: the history
alone cannot tell most decisions apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .actors import VEHICLE_COLOURS, Actor, LinearMotion, Obstacle, RouteMotion
from .ego import EgoPlan, LateralPlan, SpeedZone
from .road import LANE_WIDTH, Route, rectangle

T0 = 2.0  # the planning instant inside a simulated scene
T_END = T0 + 6.6  # the future horizon (6.4 s) plus a margin
EGO_START_S = 12.0

LONGITUDINAL = ("Stop", "Yield", "Pass", "Gap-search", "Keep distance", "Adapt speed", "Resume speed")
LATERAL = ("Lane change left", "Lane change right", "Nudge left", "Nudge right", "Turn left", "Turn right",
           "Merge", "Keep lane")
DECISIONS = LONGITUDINAL + LATERAL


@dataclass
class Cause:
    """What the CoC says the decision is for; every field here is read off the images."""

    kind: str
    distance: float = 0.0
    colour: str = ""
    side: str = ""
    detail: str = ""


@dataclass
class World:
    route: Route
    actors: list[Actor]
    plan: EgoPlan
    v0: float
    primary: str  # the decision class of the scene
    longitudinal: str | None
    lateral: str
    cause: Cause
    surfaces: list[tuple[np.ndarray, tuple[int, int, int]]] = field(default_factory=list)
    extra_routes: list[Route] = field(default_factory=list)  # other roads to draw (the through road at a turn)
    lane_end_s: float | None = None  # lane 0 ends here (merge)
    event: str = ""
    s0: float = EGO_START_S


def _base_route(rng: np.random.Generator, straight: bool = False, num_lanes: int = 2) -> Route:
    """Most roads are straight; the rest bend gently, which the ego history shows as yaw rate."""
    if straight or rng.random() < 0.55:
        return Route([(450.0, 0.0)], num_lanes=num_lanes)
    radius = rng.uniform(180, 450)
    return Route([(20.0, 0.0), (430.0, rng.choice([-1, 1]) / radius)], num_lanes=num_lanes)


def _reaction_time(rng) -> float:
    """The ego reacts to what the t0 frames show within a human-like delay around t0."""
    return T0 + rng.uniform(-0.2, 0.3)


def _cruise(rng, v0: float) -> float:
    """A cruise speed near the current one, so the history shows mild, uninformative drift."""
    return max(v0 + rng.uniform(-1.5, 1.5), 3.0)


def _vehicle(rng, route, s, offset, speed=0.0, accel=0.0, t_start=0.0, kind=None) -> tuple[Actor, str, str]:
    kind = kind or ("truck" if rng.random() < 0.3 else "car")
    colour = rng.choice(list(VEHICLE_COLOURS))
    size = (8.0, 2.5, 3.2) if kind == "truck" else (4.5, 1.9, 1.5)
    actor = Actor(kind, RouteMotion(route, s, speed, accel, offset, t_start), size, VEHICLE_COLOURS[colour])
    return actor, kind, str(colour)


def _stop_distance(v: float, rng) -> float:
    """Distance from the ego at t0 to a stop point that a comfortable stop can reach."""
    return v * v / (2 * 2.6) + rng.uniform(4.0, 12.0)


def _intersection(route: Route, s_center: float, width: float = 14.0):
    """A cross road, a stop line and a crosswalk, as ground surfaces."""
    x, y, heading = route.pose(s_center, 0.5 * LANE_WIDTH)
    road = rectangle((x, y), heading + np.pi / 2, 120.0, width)
    sx, sy, _ = route.pose(s_center - width / 2 - 1.0, 0.5 * LANE_WIDTH)
    stop_line = rectangle((sx, sy), heading, 0.5, 2 * LANE_WIDTH)
    return [(road, (85, 85, 85)), (stop_line, (240, 240, 240))], s_center - width / 2 - 1.0


def _crosswalk(route: Route, s: float):
    surfaces = []
    for lateral in np.arange(-1.0, 2 * LANE_WIDTH + 1.0, 1.2):
        x, y, heading = route.pose(s, lateral)
        surfaces.append((rectangle((x, y), heading, 3.0, 0.6), (235, 235, 235)))
    return surfaces


def _pole_object(kind, route, s, offset, size=(0.6, 0.6, 3.8), **kw) -> Actor:
    return Actor(kind, RouteMotion(route, s, offset=offset), size, **kw)


def build_red_light(rng):
    route = _base_route(rng, straight=True)
    waiting = rng.random() < 0.35  # already creeping up to the line, as at a resume-from-stop
    v0 = rng.uniform(0.0, 4.0) if waiting else rng.uniform(6, 16)
    s_line = EGO_START_S + v0 * T0 + (rng.uniform(3, 10) if waiting else _stop_distance(v0, rng))
    surfaces, s_line = _intersection(route, s_line + 8.0)
    light = _pole_object("traffic_light", route, s_line + 1.0, -2.6, light_schedule=[(0.0, "green"),
                         (T0 - rng.uniform(3.0, 4.5), "yellow"), (T0 - rng.uniform(0.1, 0.8), "red")])
    obstacle = Obstacle(RouteMotion(route, s_line), active_from=_reaction_time(rng))
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0), [obstacle], min_gap=1.0)
    distance = s_line - (EGO_START_S + v0 * T0)
    return World(route, [light], plan, v0, "Stop", "Stop", "Keep lane",
                 Cause("red_light", distance, colour="red"), surfaces)


def build_stop_sign(rng):
    route = _base_route(rng, straight=True)
    v0 = rng.uniform(3, 13)
    s_line = EGO_START_S + v0 * T0 + _stop_distance(v0, rng)
    surfaces, s_line = _intersection(route, s_line + 8.0)
    sign = _pole_object("stop_sign", route, s_line, -2.8, size=(0.2, 1.2, 2.6), colour=(30, 30, 210))
    obstacle = Obstacle(RouteMotion(route, s_line), active_from=_reaction_time(rng))
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0), [obstacle], min_gap=0.8)
    return World(route, [sign], plan, v0, "Stop", "Stop", "Keep lane",
                 Cause("stop_sign", s_line - (EGO_START_S + v0 * T0)), surfaces)


def build_yield(rng):
    route = _base_route(rng, straight=True)
    v0 = rng.uniform(5, 13)
    ego_t0 = EGO_START_S + v0 * T0
    s_cross = ego_t0 + v0 * v0 / (2 * 2.5) + rng.uniform(4.0, 12.0)
    cyclist = rng.random() < 0.35
    side = str(rng.choice(["left", "right"]))
    speed = rng.uniform(2.5, 3.5) if cyclist else rng.uniform(1.1, 1.6)
    # Start at the kerb so the person is in view at t0 and walking into the ego lane.
    lateral0 = -3.0 if side == "right" else 2 * LANE_WIDTH + 1.0
    x, y, heading = route.pose(s_cross, lateral0)
    direction = 1.0 if side == "right" else -1.0
    velocity = (direction * speed * -np.sin(heading), direction * speed * np.cos(heading))
    walk_start = T0 - rng.uniform(0.4, 0.9)
    crossing_time = (2 * LANE_WIDTH + 4.0) / speed
    colour = rng.choice(list(VEHICLE_COLOURS))
    size = (1.7, 0.6, 1.7) if cyclist else (0.5, 0.5, 1.75)
    person = Actor("cyclist" if cyclist else "pedestrian", LinearMotion((float(x), float(y)), velocity, walk_start,
                   walk_start + crossing_time), size, VEHICLE_COLOURS[colour])
    obstacle = Obstacle(RouteMotion(route, s_cross), active_from=_reaction_time(rng),
                        active_until=walk_start + crossing_time, standoff=2.0)
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0), [obstacle], min_gap=1.5)
    return World(route, [person], plan, v0, "Yield", "Yield", "Keep lane",
                 Cause("cyclist" if cyclist else "pedestrian", s_cross - ego_t0, colour=str(colour), side=side),
                 _crosswalk(route, s_cross))


def build_pass_green(rng):
    route = _base_route(rng, straight=True)
    v0 = rng.uniform(7, 16)
    s_center = EGO_START_S + v0 * T0 + rng.uniform(20, 45)
    surfaces, s_line = _intersection(route, s_center)
    light = _pole_object("traffic_light", route, s_line + 1.0, -2.6, light_schedule=[(0.0, "green")])
    plan = EgoPlan(max(v0 + rng.uniform(-0.5, 1.5), 7.0), LateralPlan(0.0))
    return World(route, [light], plan, v0, "Pass", "Pass", "Keep lane",
                 Cause("green_light", s_line - (EGO_START_S + v0 * T0), colour="green"), surfaces)


def build_gap_search(rng):
    route = _base_route(rng)
    v0 = rng.uniform(9, 16)
    ego_t0 = EGO_START_S + v0 * T0
    truck, kind, colour = _vehicle(rng, route, ego_t0 + rng.uniform(45, 70), 0.0, kind="truck")
    actors = [truck]
    for k in range(2):  # traffic in the left lane that closes the gap
        car, _, _ = _vehicle(rng, route, ego_t0 + rng.uniform(-4, 25) + 12 * k, LANE_WIDTH, speed=v0 + rng.uniform(0, 2),
                             kind="car")
        actors.append(car)
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0), [Obstacle(truck.motion, _reaction_time(rng), standoff=4.0)])
    plan.zones.append(SpeedZone(ego_t0, ego_t0 + 200, max(v0 * rng.uniform(0.45, 0.65), 4.0), _reaction_time(rng)))
    return World(route, actors, plan, v0, "Gap-search", "Gap-search", "Keep lane",
                 Cause("blocked_lane_busy_left", truck.motion.s0 - ego_t0, colour=colour, detail=kind))


def build_keep_distance(rng):
    route = _base_route(rng)
    v0 = rng.uniform(3, 18)
    ego_t0 = EGO_START_S + v0 * T0
    gap = rng.uniform(14, 32)
    braking = rng.random() < 0.5
    lead_speed = v0 * rng.uniform(0.55, 0.8) if not braking else v0 * rng.uniform(0.85, 1.0)
    lead_accel = -rng.uniform(1.5, 3.0) if braking else 0.0
    start = T0 - rng.uniform(0.2, 0.6)
    tau = T0 - start
    s_at_start = ego_t0 + gap - (lead_speed * tau + 0.5 * lead_accel * tau**2)
    lead, kind, colour = _vehicle(rng, route, s_at_start, 0.0, lead_speed, lead_accel, t_start=start)
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0), [Obstacle(lead.motion, _reaction_time(rng), standoff=lead.size[0] / 2)])
    return World(route, [lead], plan, v0, "Keep distance", "Keep distance", "Keep lane",
                 Cause("lead_braking" if braking else "lead_slow", gap, colour=colour, detail=kind))


def build_adapt_speed(rng):
    v0 = rng.uniform(10, 18)
    ego_t0 = EGO_START_S + v0 * T0
    if rng.random() < 0.5:  # a sharp curve comes into view
        distance = rng.uniform(30, 55)
        radius = rng.uniform(35, 60)
        side = str(rng.choice(["left", "right"]))
        curve_s = ego_t0 + distance
        route = Route([(curve_s, 0.0), (radius * np.pi / 2, (1 if side == "left" else -1) / radius), (200.0, 0.0)])
        sign = _pole_object("warning_sign", route, curve_s - 8.0, -2.8, size=(0.2, 1.3, 2.6),
                            colour=(30, 200, 240), arrow=side)
        plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0),
                       zones=[SpeedZone(curve_s, curve_s + radius * 1.6, np.sqrt(2.0 * radius), _reaction_time(rng))])
        return World(route, [sign], plan, v0, "Adapt speed", "Adapt speed", "Keep lane",
                     Cause("sharp_curve", distance, side=side))
    route = _base_route(rng, straight=True)
    distance = rng.uniform(25, 45)
    surfaces, s_line = _intersection(route, ego_t0 + distance + 8.0)
    light = _pole_object("traffic_light", route, s_line + 1.0, -2.6,
                         light_schedule=[(0.0, "green"), (T0 - rng.uniform(0.1, 0.8), "yellow")])
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0), zones=[SpeedZone(s_line, s_line + 20, v0 * 0.55, _reaction_time(rng))])
    return World(route, [light], plan, v0, "Adapt speed", "Adapt speed", "Keep lane",
                 Cause("yellow_light", s_line - ego_t0, colour="yellow"), surfaces)


def build_resume_speed(rng):
    route = _base_route(rng, straight=True)
    v0 = rng.uniform(0.0, 6.0)
    ego_t0 = EGO_START_S + v0 * T0
    cruise = rng.uniform(9, 14)
    go = _reaction_time(rng)
    if rng.random() < 0.5:
        distance = rng.uniform(3, 10)
        surfaces, s_line = _intersection(route, ego_t0 + distance + 8.0)
        light = _pole_object("traffic_light", route, s_line + 1.0, -2.6,
                             light_schedule=[(0.0, "red"), (T0 - rng.uniform(0.1, 0.6), "green")])
        actors, cause = [light], Cause("light_turned_green", s_line - ego_t0, colour="green")
    else:
        surfaces = []
        lead, kind, colour = _vehicle(rng, route, ego_t0 + rng.uniform(12, 20), 0.0, speed=rng.uniform(3, 6),
                                      accel=2.0, t_start=go - 1.0)
        actors, cause = [lead], Cause("lead_pulled_away", lead.motion.s0 - ego_t0, colour=colour, detail=kind)
    plan = EgoPlan(max(v0, 0.5), LateralPlan(0.0), cruise_change_at=go, resume_speed=cruise)
    return World(route, actors, plan, v0, "Resume speed", "Resume speed", "Keep lane", cause, surfaces)


def _lane_change(rng, direction: str):
    route = _base_route(rng)
    v0 = rng.uniform(9, 18)
    ego_t0 = EGO_START_S + v0 * T0
    start_lane = 0 if direction == "left" else 1
    target_lane = 1 - start_lane
    distance = rng.uniform(30, 55)
    blocker, kind, colour = _vehicle(rng, route, ego_t0 + distance, start_lane * LANE_WIDTH,
                                     speed=rng.uniform(0, v0 * 0.4))
    start = _reaction_time(rng)
    delta = (target_lane - start_lane) * LANE_WIDTH
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(start_lane * LANE_WIDTH, [(start, rng.uniform(3.0, 4.0), delta)]))
    decision = f"Lane change {direction}"
    return World(route, [blocker], plan, v0, decision, None, decision,
                 Cause("slow_vehicle_in_lane", distance, colour=colour, detail=kind, side=direction))


def build_lane_change_left(rng):
    return _lane_change(rng, "left")


def build_lane_change_right(rng):
    return _lane_change(rng, "right")


def _nudge(rng, direction: str):
    route = _base_route(rng, num_lanes=1)
    v0 = rng.uniform(6, 13)
    ego_t0 = EGO_START_S + v0 * T0
    distance = rng.uniform(18, 35)
    # The obstacle intrudes from the side opposite to the nudge.
    side_offset = -1.7 if direction == "left" else 1.7
    if rng.random() < 0.5:
        blocker, kind, colour = _vehicle(rng, route, ego_t0 + distance, side_offset * 1.05, kind="car")
        actors = [blocker]
    else:
        kind, colour = "cones", "orange"
        actors = [Actor("cone", RouteMotion(route, ego_t0 + distance + 2.5 * k, offset=side_offset * 0.8),
                        (0.5, 0.5, 0.8), (20, 120, 250)) for k in range(4)]
    sign = 1.0 if direction == "left" else -1.0
    start = _reaction_time(rng)
    pass_time = distance / max(v0, 1.0)
    lateral = LateralPlan(0.0, [(start, 1.8, 0.9 * sign), (start + pass_time + 1.5, 2.0, -0.9 * sign)])
    ego_s = ego_t0 + v0 * (start - T0)
    plan = EgoPlan(_cruise(rng, v0), lateral, zones=[SpeedZone(ego_s, ego_s + distance + 10, 0.85 * v0, start)])
    decision = f"Nudge {direction}"
    return World(route, actors, plan, v0, decision, None, decision,
                 Cause("obstacle_at_edge", distance, colour=colour, detail=kind,
                       side="right" if direction == "left" else "left"))


def build_nudge_left(rng):
    return _nudge(rng, "left")


def build_nudge_right(rng):
    return _nudge(rng, "right")


def _turn(rng, direction: str):
    v0 = rng.uniform(6, 11)
    ego_t0 = EGO_START_S + v0 * T0
    distance = rng.uniform(8, 20)
    radius = rng.uniform(11, 14) if direction == "left" else rng.uniform(7, 9)
    turn_s = ego_t0 + distance
    kappa = (1 if direction == "left" else -1) / radius
    route = Route([(turn_s, 0.0), (radius * np.pi / 2, kappa), (200.0, 0.0)])
    through = Route([(turn_s + 200.0, 0.0)])
    surfaces, _ = _intersection(through, turn_s + radius - LANE_WIDTH / 2, width=16.0)
    surfaces = surfaces[:1]  # a turn has no stop line
    sign = _pole_object("route_sign", through, turn_s - 6.0, -2.8 if direction == "right" else 2 * LANE_WIDTH + 0.8,
                        size=(0.2, 1.4, 2.8), colour=(200, 110, 20), arrow=direction)
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0),
                   zones=[SpeedZone(turn_s, turn_s + radius * 1.6, np.sqrt(1.8 * radius), _reaction_time(rng))])
    decision = f"Turn {direction}"
    world = World(route, [sign], plan, v0, decision, None, decision, Cause("route_turn", distance, side=direction), surfaces)
    world.extra_routes = [through]  # rendered as road surface too
    return world


def build_turn_left(rng):
    return _turn(rng, "left")


def build_turn_right(rng):
    return _turn(rng, "right")


def build_merge(rng):
    route = _base_route(rng, straight=True)
    v0 = rng.uniform(9, 16)
    ego_t0 = EGO_START_S + v0 * T0
    distance = rng.uniform(35, 60)
    sign = _pole_object("lane_end_sign", route, ego_t0 + distance - 10.0, -2.8, size=(0.2, 1.3, 2.6),
                        colour=(30, 200, 240), arrow="left")
    start = _reaction_time(rng) + max(distance - 3.0 * v0 - 10.0, 0.0) / v0
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0, [(start, rng.uniform(3.0, 4.0), LANE_WIDTH)]))
    world = World(route, [sign], plan, v0, "Merge", None, "Merge", Cause("lane_ends", distance, side="right"))
    world.lane_end_s = ego_t0 + distance
    return world


def build_keep_lane(rng):
    route = _base_route(rng)
    v0 = rng.uniform(3, 20)
    actors = []
    if rng.random() < 0.5:  # traffic in the other lane, nothing in ours
        car, _, _ = _vehicle(rng, route, EGO_START_S + v0 * T0 + rng.uniform(10, 40), LANE_WIDTH, speed=v0 * 1.05)
        actors.append(car)
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0))
    return World(route, actors, plan, v0, "Keep lane", None, "Keep lane", Cause("clear_road"))


BUILDERS = {
    "red_light": build_red_light,
    "stop_sign": build_stop_sign,
    "yield": build_yield,
    "pass_green": build_pass_green,
    "gap_search": build_gap_search,
    "keep_distance": build_keep_distance,
    "adapt_speed": build_adapt_speed,
    "resume_speed": build_resume_speed,
    "lane_change_left": build_lane_change_left,
    "lane_change_right": build_lane_change_right,
    "nudge_left": build_nudge_left,
    "nudge_right": build_nudge_right,
    "turn_left": build_turn_left,
    "turn_right": build_turn_right,
    "merge": build_merge,
    "keep_lane": build_keep_lane,
}


def build_world(rng: np.random.Generator, event: str | None = None) -> World:
    event = event or str(rng.choice(list(BUILDERS)))
    world = BUILDERS[event](rng)
    world.event = event
    return world
