"""What a closed-loop episode is judged by, and the one-number score.

Every metric reads the closed-loop part only (from the planner's first tick to the end), except
the stop-sign rule, which also counts a stop made before the planner took over. The ego is a
4.8 x 1.9 m box (`vehicle.EGO_LENGTH`, `EGO_WIDTH`), actors are their own boxes (`Actor.size`).

- **collision**: the ego's box overlaps an actor's box at any 20 ms step (any actor, signs and
  poles included; no at-fault analysis: the world's actors do not react, so every contact is
  the ego's doing or its failure to avoid). `collision_t`, `collision_with` say when and what.
- **off-road**: a corner of the ego's box off the drivable area: more than OFFROAD_TOLERANCE
  beyond the edge lines of the route's carriageway (`Route.edge_offsets`; past a lane end, lane
  0 no longer counts) and of any other road of the world (the through road at a turn), and not
  on a junction's surface (`events.JUNCTION_COLOUR`). `offroad_s`: seconds spent so.
- **lane departure**: the ego's lane (its centre's offset rounded to a lane) differs from the
  lane the scenario's own plan holds at that time (`World.plan.lateral`) for more than
  LANE_DEPARTURE_S in total: changing lanes late is fine, ending up in the wrong lane is not.
- **red-light violation**: the ego's front crosses a stop line while the signal head that
  controls it (the first light within LIGHT_SEARCH_M past the line) shows red. Stop lines are
  the world's stop-line surfaces (`events.STOP_LINE_COLOUR`).
- **stop-sign violation**: the ego's front crosses a stop line governed by a stop sign without
  having been slower than STOP_SPEED while its front was within STOP_ZONE_M before the line.
- **progress**: arc length driven along the route, over what the world's scripted driver (the
  reference, IDM with the scenario's knowledge) drives in the same time, capped at 1; 1 when
  the reference itself stays within 1 m (a red light that never turns green).
- **comfort**: speed and heading at 10 Hz, each smoothed by a 0.5 s moving average before every
  derivative (nuPlan smooths with a Savitzky-Golay filter): max |jerk| (longitudinal) and max
  |lateral acceleration| = speed x yaw rate; `comfortable` when within nuPlan's bounds
  MAX_JERK and MAX_LAT_ACCEL.
- **min time-to-collision**: at 10 Hz, the ego and every actor are moved on at their current
  velocities (constant-velocity forward simulation, 0.1 s steps, TTC_HORIZON_S ahead); the
  first overlap of the boxes is that instant's TTC. The episode's minimum, capped at the horizon.
- **decision agreement**: `coc.decision_from_coc` of the first plan's CoC equals the scenario's
  primary decision (at the first tick the ego is where a dataset scene's t0 is, so the label is
  valid there); `decision_share`: the share of all plans that state it (later ticks may rightly
  move on, e.g. to Keep lane after a lane change).
- **score**, in the spirit of AlpaSim / NAVSIM's PDM score (multipliers for the hard failures,
  a weighted mean of the soft ones):

      score = NC x DAC x 0.5^(red-light + stop-sign violations) x (5 TTC + 5 EP + 2 C) / 12

  NC = 1 without collision else 0; DAC = 1 without off-road else 0; TTC = 1 when min TTC >=
  TTC_BOUND_S else 0; EP = progress; C = 1 when comfortable else 0. Between 0 and 1.
"""
from __future__ import annotations

import numpy as np

from ..scenarios.actors import Actor, RouteMotion
from ..scenarios.ego import SIM_DT
from ..scenarios.events import JUNCTION_COLOUR, STOP_LINE_COLOUR
from .episode import Episode
from .geometry import box_corners, boxes_overlap, inside_convex, route_position
from .vehicle import EGO_LENGTH, EGO_WIDTH

OFFROAD_TOLERANCE = 0.3  # m beyond the edge line (itself 0.15 m wide): a wheel on the kerb is not yet off-road
LANE_DEPARTURE_S = 2.0  # s in a lane the scenario does not drive in
LIGHT_SEARCH_M = 20.0  # a signal head or stop sign this far past a stop line controls it
STOP_ZONE_M = 10.0  # m before a stop line where the ego must stop at a stop sign...
STOP_SPEED = 0.5  # m/s ... by being slower than this
TTC_HORIZON_S = 3.0
TTC_BOUND_S = 0.9  # NAVSIM's time-to-collision bound
MAX_JERK = 4.13  # m/s^3, nuPlan's longitudinal jerk bound
MAX_LAT_ACCEL = 4.89  # m/s^2, nuPlan's lateral acceleration bound
VIOLATION_FACTOR = 0.5  # each traffic-rule violation halves the score
COMFORT_STEP = 0.1  # s: the rate the comfort signals are read at
SMOOTHING_S = 0.5


def episode_metrics(episode: Episode) -> dict:
    """The metrics of one episode (see the module docstring), JSON-ready."""
    start = episode.start_index
    collision = first_collision(episode)
    offroad_steps = offroad_mask(episode)[start:]
    red, stop = traffic_rule_violations(episode)
    jerk, lateral = comfort(episode)
    ttc = min_time_to_collision(episode)
    ego, reference = episode.s[-1] - episode.s[start], episode.reference.s[-1] - episode.reference.s[start]
    progress = 1.0 if reference < 1.0 else float(np.clip(ego / reference, 0.0, 1.0))
    decisions = [p.decision for p in episode.plans]
    wrong_lane = wrong_lane_seconds(episode)
    metrics = {
        "seed": episode.seed,
        "event": episode.event,
        "decision": episode.decision,
        "collision": collision is not None,
        "collision_t": None if collision is None else collision[0],
        "collision_with": None if collision is None else collision[1],
        "offroad": bool(offroad_steps.any()),
        "offroad_s": float(offroad_steps.sum() * SIM_DT),
        "lane_departure": wrong_lane > LANE_DEPARTURE_S,
        "wrong_lane_s": wrong_lane,
        "red_light_violations": red,
        "stop_sign_violations": stop,
        "progress": progress,
        "progress_m": float(ego),
        "reference_progress_m": float(reference),
        "max_abs_jerk": jerk,
        "max_abs_lat_accel": lateral,
        "comfortable": jerk <= MAX_JERK and lateral <= MAX_LAT_ACCEL,
        "min_ttc_s": ttc,
        "first_decision": decisions[0] if decisions else None,  # None: no planner (the scripted driver)
        "decision_agrees": decisions[0] == episode.decision if decisions else None,
        "decision_share": float(np.mean([d == episode.decision for d in decisions])) if decisions else None,
        "plans": len(episode.plans),
        "rejected_plans": sum(p.rejected is not None for p in episode.plans),
        "plan_latency_ms": [p.latency_ms for p in episode.plans],
    }
    metrics["score"] = score(metrics)
    return metrics


def score(m: dict) -> float:
    """The PDM-style score of one episode's metrics (formula in the module docstring)."""
    multiplier = (0.0 if m["collision"] else 1.0) * (0.0 if m["offroad"] else 1.0)
    multiplier *= VIOLATION_FACTOR ** (m["red_light_violations"] + m["stop_sign_violations"])
    weighted = 5 * float(m["min_ttc_s"] >= TTC_BOUND_S) + 5 * m["progress"] + 2 * float(m["comfortable"])
    return float(multiplier * weighted / 12)


def aggregate(rows: list[dict]) -> dict:
    """One mode's episodes -> rates and means (the summary table's row)."""
    latencies = [ms for m in rows for ms in m["plan_latency_ms"]]

    def mean(key: str) -> float | None:
        """Over the episodes that have the metric (None: a planner-less episode's decision)."""
        values = [float(m[key]) for m in rows if m[key] is not None]
        return float(np.mean(values)) if values else None

    return {
        "episodes": len(rows),
        "score": mean("score"),
        "score_std": float(np.std([m["score"] for m in rows])),
        "collision_rate": mean("collision"),
        "offroad_rate": mean("offroad"),
        "lane_departure_rate": mean("lane_departure"),
        "red_light_violations": int(sum(m["red_light_violations"] for m in rows)),
        "stop_sign_violations": int(sum(m["stop_sign_violations"] for m in rows)),
        "progress": mean("progress"),
        "comfort_rate": mean("comfortable"),
        "max_abs_jerk_mean": mean("max_abs_jerk"),
        "max_abs_lat_accel_mean": mean("max_abs_lat_accel"),
        "min_ttc_s_mean": mean("min_ttc_s"),
        "decision_agreement": mean("decision_agrees"),
        "decision_share": mean("decision_share"),
        "plan_latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else None,
        "plan_latency_ms_p90": float(np.percentile(latencies, 90)) if latencies else None,
    }


# --- the individual metrics -------------------------------------------------------------------

def ego_corners(episode: Episode, i: int) -> np.ndarray:
    return box_corners(episode.x[i], episode.y[i], episode.yaw[i], EGO_LENGTH, EGO_WIDTH)


def actor_corners(actor: Actor, t: float) -> np.ndarray:
    x, y, yaw = actor.motion.pose(t)
    return box_corners(x, y, yaw, actor.size[0], actor.size[1])


def first_collision(episode: Episode) -> tuple[float, str] | None:
    """(time, actor kind) of the first overlap of the ego with an actor, or None."""
    for i in range(episode.start_index, len(episode.t)):
        t, ego = episode.t[i], ego_corners(episode, i)
        for actor in episode.world.actors:
            x, y, _ = actor.motion.pose(t)
            if np.hypot(x - episode.x[i], y - episode.y[i]) > EGO_LENGTH + max(actor.size[:2]):
                continue  # too far apart to touch
            if boxes_overlap(ego, actor_corners(actor, t)):
                return float(t), actor.kind
    return None


def offroad_mask(episode: Episode) -> np.ndarray:
    """Per step: a corner of the ego's box off the drivable area (see `on_drivable_area`)."""
    mask = np.zeros(len(episode.t), bool)
    for i in range(len(episode.t)):
        mask[i] = not all(on_drivable_area(episode.world, corner, episode.s[i]) for corner in ego_corners(episode, i))
    return mask


def on_drivable_area(world, point: np.ndarray, s_hint: float) -> bool:
    """Within OFFROAD_TOLERANCE of the route's carriageway (lane 0 gone past a lane end), of
    another road's (the through road at a turn), or on a junction's surface."""
    route = world.route
    s, offset = route_position(route, float(point[0]), float(point[1]), s_hint)
    right, left = route.edge_offsets()
    if world.lane_end_s is not None and s > world.lane_end_s:
        right = 0.5 * route.lane_width
    if right - OFFROAD_TOLERANCE <= offset <= left + OFFROAD_TOLERANCE:
        return True
    for extra in world.extra_routes:
        _, offset = route_position(extra, float(point[0]), float(point[1]))
        right, left = extra.edge_offsets()
        if right - OFFROAD_TOLERANCE <= offset <= left + OFFROAD_TOLERANCE:
            return True
    return any(inside_convex(np.asarray(polygon), point) for polygon, colour in world.surfaces
               if tuple(colour) == JUNCTION_COLOUR)


def wrong_lane_seconds(episode: Episode) -> float:
    """Closed-loop seconds the ego's centre spends in a lane other than the scenario's."""
    start, width = episode.start_index, episode.world.route.lane_width
    intended = np.array([episode.world.plan.lateral.offset(t) for t in episode.t[start:]])
    wrong = np.round(episode.offset[start:] / width) != np.round(intended / width)
    return float(wrong.sum() * SIM_DT)


def stop_lines(episode: Episode) -> list[tuple[float, Actor | None]]:
    """(arc length, controlling light or stop sign or None) of every stop line on the route."""
    world = episode.world
    lines = []
    for polygon, colour in world.surfaces:
        if tuple(colour) != STOP_LINE_COLOUR:
            continue
        x, y = np.asarray(polygon).mean(axis=0)
        s_line, _ = route_position(world.route, float(x), float(y))
        controls = [(a.motion.s0 - s_line, a) for a in world.actors
                    if a.kind in ("traffic_light", "stop_sign") and isinstance(a.motion, RouteMotion)
                    and a.motion.route is world.route and -1.0 <= a.motion.s0 - s_line <= LIGHT_SEARCH_M]
        lines.append((s_line, min(controls, key=lambda c: c[0])[1] if controls else None))
    return lines


def traffic_rule_violations(episode: Episode) -> tuple[int, int]:
    """(red-light violations, stop-sign violations) in the closed-loop part."""
    front = episode.s + EGO_LENGTH / 2
    red = stop = 0
    for s_line, control in stop_lines(episode):
        if control is None:
            continue
        crossed = np.nonzero((front[:-1] < s_line) & (front[1:] >= s_line))[0] + 1
        crossed = crossed[crossed > episode.start_index]
        if not len(crossed):
            continue
        i = int(crossed[0])
        if control.kind == "traffic_light" and control.light(episode.t[i]) == "red":
            red += 1
        if control.kind == "stop_sign":
            zone = (front[:i] >= s_line - STOP_ZONE_M) & (front[:i] < s_line)
            if not zone.any() or episode.v[:i][zone].min() > STOP_SPEED:
                stop += 1
    return red, stop


def _smooth(values: np.ndarray, samples: int) -> np.ndarray:
    """Centred moving average, the ends averaged over what exists."""
    kernel = np.ones(samples)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones_like(values), kernel, "same")


def comfort(episode: Episode) -> tuple[float, float]:
    """(max |jerk| m/s^3, max |lateral acceleration| m/s^2) of the closed-loop part."""
    stride = int(round(COMFORT_STEP / SIM_DT))
    window = max(int(round(SMOOTHING_S / COMFORT_STEP)), 1)
    v = episode.v[episode.start_index::stride]
    yaw = np.unwrap(episode.yaw[episode.start_index::stride])
    if len(v) < 3:
        return 0.0, 0.0
    accel = _smooth(np.gradient(_smooth(v, window), COMFORT_STEP), window)
    jerk = np.gradient(accel, COMFORT_STEP)
    yaw_rate = np.gradient(_smooth(yaw, window), COMFORT_STEP)
    lateral = _smooth(v, window) * yaw_rate
    return float(np.abs(jerk).max()), float(np.abs(lateral).max())


def min_time_to_collision(episode: Episode) -> float:
    """The smallest constant-velocity time-to-collision over the closed-loop part (see the
    module docstring), capped at TTC_HORIZON_S."""
    stride = int(round(COMFORT_STEP / SIM_DT))
    horizon = np.arange(0.0, TTC_HORIZON_S + 1e-9, COMFORT_STEP)
    reach = EGO_LENGTH + TTC_HORIZON_S * 40.0  # m: nothing further can meet the ego within the horizon
    best = TTC_HORIZON_S
    for i in range(episode.start_index, len(episode.t) - stride, stride):
        t = episode.t[i]
        ego_velocity = episode.v[i] * np.array([np.cos(episode.yaw[i]), np.sin(episode.yaw[i])])
        ego = ego_corners(episode, i)
        for actor in episode.world.actors:
            x, y, yaw = actor.motion.pose(t)
            if np.hypot(x - episode.x[i], y - episode.y[i]) > reach:
                continue
            x1, y1, _ = actor.motion.pose(t + COMFORT_STEP)
            velocity = np.array([x1 - x, y1 - y]) / COMFORT_STEP
            corners = box_corners(x, y, yaw, actor.size[0], actor.size[1])
            for tau in horizon:
                if tau >= best:
                    break
                if boxes_overlap(ego + tau * ego_velocity, corners + tau * velocity):
                    best = float(tau)
                    break
    return best
