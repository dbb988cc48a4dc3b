"""The scenario catalogue: each builder sets up a road, the actors and the ego's response.

A builder decides the ground-truth driving decision by construction and makes the ego
behave accordingly, so the decision always agrees with the future motion. Causes (lights,
people, obstacles, signs) are placed so that they are visible in the camera frames at t0,
while the ego's reaction starts at most a few tenths of a second before t0: the history
alone cannot tell most decisions apart.

Besides cruising traffic, the world has the ego at low speed and at rest, as at every red light:
standing at a red light or a stop line, behind a stopped queue or parked at the kerb (held still
by an obstacle inside the IDM's minimum gap, so its speed is exactly zero), starting from rest
when the light turns green, the lead pulls away or the kerb lane is left, creeping behind a
crawling queue, and mid-way through a turn at t0, so the history itself is curved.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .actors import VEHICLE_COLOURS, Actor, LinearMotion, Obstacle, RouteMotion
from .ego import EGO_HALF_LENGTH, EgoPlan, LateralPlan, SpeedZone
from .road import LANE_WIDTH, Route, rectangle

T0 = 2.0  # the planning instant inside a simulated scene
T_END = T0 + 6.6  # the future horizon (6.4 s) plus a margin
EGO_START_S = 12.0
STOP_LINE_COLOUR = (240, 240, 240)  # the stop line's ground surface; the simulator finds stop lines by it
JUNCTION_COLOUR = (85, 85, 85)  # a cross road's surface: drivable, as the simulator's off-road check knows

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


def _pick(rng, shares: dict[str, float]) -> str:
    """One of a builder's situations, drawn with the given shares."""
    return str(rng.choice(list(shares), p=list(shares.values())))


def _rest_gap(min_gap: float) -> float:
    """A gap ahead of a standing ego that holds it still: inside the IDM's minimum gap its braking
    term wins at zero speed, so the ego stays exactly where it is."""
    return 0.9 * min_gap


def _rest_distance(min_gap: float) -> float:
    """How far ahead of a standing ego's centre a stop point holds it still."""
    return EGO_HALF_LENGTH + _rest_gap(min_gap)


def _hold(route: Route, min_gap: float, until: float = 1e9) -> Obstacle:
    """An invisible obstacle that keeps an ego standing at EGO_START_S at rest until `until`
    (a stop line, a parked car's own brakes)."""
    return Obstacle(RouteMotion(route, EGO_START_S + _rest_distance(min_gap)), active_until=until)


def _lead(rng, route: Route, gap: float, **motion) -> tuple[Actor, Obstacle, str, str]:
    """A vehicle in the ego lane whose rear is `gap` metres ahead of the front of the ego at
    EGO_START_S at t = 0, the obstacle it is for the ego, its kind and its colour."""
    lead, kind, colour = _vehicle(rng, route, EGO_START_S, 0.0, **motion)
    lead.motion.s0 += EGO_HALF_LENGTH + lead.size[0] / 2 + gap
    return lead, Obstacle(lead.motion, standoff=lead.size[0] / 2), kind, colour


def _traffic_light(route: Route, s_line: float, schedule: list[tuple[float, str]], across: bool = False) -> Actor:
    """A signal head beside the stop line or, for an ego close to the line, across the
    intersection (as at real junctions): a head beside the line is then above the cameras' view."""
    return _pole_object("traffic_light", route, s_line + (16.0 if across else 1.0), -2.6, light_schedule=schedule)


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
    return [(road, JUNCTION_COLOUR), (stop_line, STOP_LINE_COLOUR)], s_center - width / 2 - 1.0


def _crosswalk(route: Route, s: float):
    surfaces = []
    for lateral in np.arange(-1.0, 2 * LANE_WIDTH + 1.0, 1.2):
        x, y, heading = route.pose(s, lateral)
        surfaces.append((rectangle((x, y), heading, 3.0, 0.6), (235, 235, 235)))
    return surfaces


def _pole_object(kind, route, s, offset, size=(0.6, 0.6, 3.8), **kw) -> Actor:
    return Actor(kind, RouteMotion(route, s, offset=offset), size, **kw)


def build_red_light(rng):
    """Stop at a red light: approaching it, creeping up to it, standing at its line, or standing
    behind the stopped car in front."""
    route = _base_route(rng, straight=True)
    situation = _pick(rng, {"approach": 0.35, "creeping": 0.25, "at_rest": 0.25, "queue": 0.15})
    min_gap = 1.0
    if situation == "approach":
        v0 = rng.uniform(6, 16)
        s_line = EGO_START_S + v0 * T0 + _stop_distance(v0, rng)
        red_since, cruise, react = T0 - rng.uniform(0.1, 0.8), _cruise(rng, v0), _reaction_time(rng)
    elif situation == "creeping":  # rolling up to the line at walking pace, the light red for a while
        v0 = rng.uniform(0.6, 1.8)
        s_line = EGO_START_S + v0 * T0 + rng.uniform(3, 8)
        red_since, cruise, react = T0 - rng.uniform(1.0, 4.0), v0, -1e9
    else:  # standing since before the history began
        v0, red_since, cruise, react = 0.0, -1.0, rng.uniform(9, 14), -1e9
        s_line = EGO_START_S + _rest_distance(min_gap)
    actors, obstacles = [], []
    if situation == "queue":
        lead, obstacle, kind, colour = _lead(rng, route, _rest_gap(min_gap))
        s_line = lead.motion.s0 + lead.size[0] / 2 + rng.uniform(1.0, 5.0)
        actors.append(lead)
        obstacles.append(obstacle)
        cause = Cause("stopped_traffic", lead.motion.s0 - EGO_START_S, colour=colour, detail=kind)
    surfaces, s_line = _intersection(route, s_line + 8.0)
    schedule = [(0.0, "green"), (red_since - rng.uniform(2.5, 3.5), "yellow"), (red_since, "red")]
    light = _traffic_light(route, s_line, schedule, across=situation != "approach")
    actors.append(light)
    if situation != "queue":
        cause = Cause("red_light", light.motion.s0 - (EGO_START_S + v0 * T0), colour="red")
    obstacles.append(Obstacle(RouteMotion(route, s_line), active_from=react))
    plan = EgoPlan(cruise, LateralPlan(0.0), obstacles, min_gap=min_gap)
    return World(route, actors, plan, v0, "Stop", "Stop", "Keep lane", cause, surfaces)


def build_stop_sign(rng):
    """Stop at a stop sign: approaching it, or standing a few metres before its line (closer,
    the sign beside the line is out of the cameras' view)."""
    route = _base_route(rng, straight=True)
    if rng.random() < 0.7:
        v0, min_gap = rng.uniform(3, 13), 0.8
        s_line = EGO_START_S + v0 * T0 + _stop_distance(v0, rng)
        cruise, react = _cruise(rng, v0), _reaction_time(rng)
    else:
        v0, min_gap, cruise, react = 0.0, rng.uniform(3.5, 5.0), rng.uniform(8, 12), -1e9
        s_line = EGO_START_S + _rest_distance(min_gap)
    surfaces, s_line = _intersection(route, s_line + 8.0)
    sign = _pole_object("stop_sign", route, s_line, -2.8, size=(0.2, 1.2, 2.6), colour=(30, 30, 210))
    obstacle = Obstacle(RouteMotion(route, s_line), active_from=react)
    plan = EgoPlan(cruise, LateralPlan(0.0), [obstacle], min_gap=min_gap)
    return World(route, [sign], plan, v0, "Stop", "Stop", "Keep lane",
                 Cause("stop_sign", s_line - (EGO_START_S + v0 * T0)), surfaces)


def build_yield(rng):
    """Yield to a person crossing ahead, or, parked at the kerb, to the traffic passing on the left."""
    if rng.random() < 0.3:
        return _yield_parked(rng)
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


def _yield_parked(rng):
    """Parked towards the kerb, the ego waits for a car passing in the left lane, then sets off
    and moves over to the lane centre."""
    route = _base_route(rng, straight=True)
    car, kind, colour = _vehicle(rng, route, EGO_START_S + rng.uniform(4, 15), LANE_WIDTH, speed=rng.uniform(7, 12),
                                 t_start=T0, kind="car")
    clear = T0 + rng.uniform(0.8, 2.5)
    kerb = -rng.uniform(0.5, 0.9)
    plan = EgoPlan(rng.uniform(8, 12), LateralPlan(kerb, [(clear + 1.0, 3.0, -kerb)]))
    plan.obstacles.append(_hold(route, plan.min_gap, clear))
    return World(route, [car], plan, 0.0, "Yield", "Yield", "Keep lane",
                 Cause("traffic_passing", car.motion.s0 - EGO_START_S, colour=colour, detail=kind, side="left"))


def build_pass_green(rng):
    route = _base_route(rng, straight=True)
    v0 = rng.uniform(7, 16)
    s_center = EGO_START_S + v0 * T0 + rng.uniform(20, 45)
    surfaces, s_line = _intersection(route, s_center)
    light = _traffic_light(route, s_line, [(0.0, "green")])
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
    """Keep distance to a slower or braking lead, or creep behind a crawling queue."""
    if rng.random() < 0.45:
        return _creep_in_queue(rng)
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


def _creep_in_queue(rng):
    """A queue crawls at walking pace and the ego creeps behind it at the IDM's equilibrium gap."""
    route = _base_route(rng, straight=True)
    crawl = rng.uniform(0.6, 1.6)
    plan = EgoPlan(_cruise(rng, crawl), LateralPlan(0.0))
    # Starting at the IDM's desired gap for this speed, the ego keeps crawling with the queue.
    lead, obstacle, kind, colour = _lead(rng, route, plan.min_gap + crawl * plan.time_headway, speed=crawl)
    plan.obstacles.append(obstacle)
    v0 = crawl * rng.uniform(0.9, 1.1)
    distance = lead.motion.s_and_speed(T0)[0] - (EGO_START_S + v0 * T0)
    return World(route, [lead], plan, v0, "Keep distance", "Keep distance", "Keep lane",
                 Cause("lead_creeping", distance, colour=colour, detail=kind))


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
    light = _traffic_light(route, s_line, [(0.0, "green"), (T0 - rng.uniform(0.1, 0.8), "yellow")])
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0), zones=[SpeedZone(s_line, s_line + 20, v0 * 0.55, _reaction_time(rng))])
    return World(route, [light], plan, v0, "Adapt speed", "Adapt speed", "Keep lane",
                 Cause("yellow_light", s_line - ego_t0, colour="yellow"), surfaces)


def build_resume_speed(rng):
    """Speed up when the light turns green or the lead pulls away: rolling slowly towards the
    light, or standing and starting to move (before t0, so the history shows the start, or just
    after it)."""
    route = _base_route(rng, straight=True)
    if rng.random() < 0.25:
        return _resume_rolling(rng, route)
    go = T0 + rng.uniform(-1.4, 0.3)
    cruise = rng.uniform(9, 14)
    if rng.random() < 0.5:
        plan = EgoPlan(cruise, LateralPlan(0.0), min_gap=1.0)
        plan.obstacles.append(_hold(route, plan.min_gap, go))
        distance = _rest_distance(plan.min_gap)
        surfaces, s_line = _intersection(route, EGO_START_S + distance + 8.0)
        light = _traffic_light(route, s_line, [(0.0, "red"), (go - rng.uniform(0.3, 0.8), "green")], across=True)
        return World(route, [light], plan, 0.0, "Resume speed", "Resume speed", "Keep lane",
                     Cause("light_turned_green", distance, colour="green"), surfaces)
    # The lead moves off at `go` - 0.5..1 s and the widening gap lets the ego start (IDM).
    plan = EgoPlan(cruise, LateralPlan(0.0))
    lead, obstacle, kind, colour = _lead(rng, route, _rest_gap(plan.min_gap), accel=2.0,
                                         t_start=go - rng.uniform(0.5, 1.0))
    plan.obstacles.append(obstacle)
    return World(route, [lead], plan, 0.0, "Resume speed", "Resume speed", "Keep lane",
                 Cause("lead_pulled_away", lead.motion.s_and_speed(T0)[0] - EGO_START_S, colour=colour, detail=kind))


def _resume_rolling(rng, route: Route) -> World:
    """Rolling slowly, the ego speeds up as the light turns green or the lead pulls away."""
    v0 = rng.uniform(1.0, 6.0)
    ego_t0 = EGO_START_S + v0 * T0
    cruise = rng.uniform(9, 14)
    go = _reaction_time(rng)
    if rng.random() < 0.5:
        distance = rng.uniform(3, 10)
        surfaces, s_line = _intersection(route, ego_t0 + distance + 8.0)
        light = _traffic_light(route, s_line, [(0.0, "red"), (T0 - rng.uniform(0.1, 0.6), "green")], across=True)
        actors, cause = [light], Cause("light_turned_green", s_line - ego_t0, colour="green")
    else:
        surfaces = []
        lead, kind, colour = _vehicle(rng, route, ego_t0 + rng.uniform(12, 20), 0.0, speed=rng.uniform(3, 6),
                                      accel=2.0, t_start=go - 1.0)
        actors, cause = [lead], Cause("lead_pulled_away", lead.motion.s0 - ego_t0, colour=colour, detail=kind)
    plan = EgoPlan(v0, LateralPlan(0.0), cruise_change_at=go, resume_speed=cruise)
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
    """Turn at an intersection: approaching it, or already mid-way through the turn at t0 (the
    history curves)."""
    radius = rng.uniform(11, 14) if direction == "left" else rng.uniform(7, 9)
    turn_speed = np.sqrt(1.8 * radius)
    if rng.random() < 0.5:
        v0 = turn_speed * rng.uniform(0.85, 1.0)
        distance = -rng.uniform(0.4, 0.9) * radius  # the arc already driven at t0
        cause, notice = Cause("route_turning", side=direction), -1e9
    else:
        v0 = rng.uniform(6, 11)
        distance = rng.uniform(8, 20)
        cause, notice = Cause("route_turn", distance, side=direction), _reaction_time(rng)
    turn_s = EGO_START_S + v0 * T0 + distance
    kappa = (1 if direction == "left" else -1) / radius
    route = Route([(turn_s, 0.0), (radius * np.pi / 2, kappa), (200.0, 0.0)])
    through = Route([(turn_s + 200.0, 0.0)])
    surfaces, _ = _intersection(through, turn_s + radius - LANE_WIDTH / 2, width=16.0)
    surfaces = surfaces[:1]  # a turn has no stop line
    sign = _pole_object("route_sign", through, turn_s - 6.0, -2.8 if direction == "right" else 2 * LANE_WIDTH + 0.8,
                        size=(0.2, 1.4, 2.8), colour=(200, 110, 20), arrow=direction)
    plan = EgoPlan(_cruise(rng, v0), LateralPlan(0.0),
                   zones=[SpeedZone(turn_s, turn_s + radius * 1.6, turn_speed, notice)])
    decision = f"Turn {direction}"
    world = World(route, [sign], plan, v0, decision, None, decision, cause, surfaces)
    world.extra_routes = [through]  # rendered as road surface too
    return world


def build_turn_left(rng):
    return _turn(rng, "left")


def build_turn_right(rng):
    return _turn(rng, "right")


def build_merge(rng):
    """Merge left where the lane ends, or pull out from the kerb into the clear left lane."""
    if rng.random() < 0.35:
        return _pull_out(rng)
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


def _pull_out(rng):
    """Parked behind another parked car, the ego sets off (before t0 or just after) and, once
    rolling, moves over into the left lane."""
    route = _base_route(rng, straight=True)
    parked, _, _ = _vehicle(rng, route, EGO_START_S + rng.uniform(11, 16), 0.0, kind="car")
    go = T0 + rng.uniform(-1.4, 0.4)
    plan = EgoPlan(rng.uniform(8, 12), LateralPlan(0.0, [(go + 0.8, rng.uniform(3.0, 4.0), LANE_WIDTH)]))
    plan.obstacles.append(_hold(route, plan.min_gap, go))
    return World(route, [parked], plan, 0.0, "Merge", None, "Merge", Cause("left_lane_clear", side="left"))


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
