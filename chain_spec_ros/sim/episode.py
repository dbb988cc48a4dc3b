"""One closed-loop episode: a seeded scenario world, the planner in the driver's seat.

Timeline (simulated time, SIM_DT = 20 ms steps, the world's own rate):
- 0 .. start_s (T0 = 2 s): the world's scripted driver (IDM + lateral plan) drives, exactly as
  in a dataset scene, so the first plan sees the history and frames the planner was trained on;
- start_s .. start_s + duration_s: every 1 / plan_rate_hz the cameras are rendered from the
  ego's actual poses at the frame instants, the history is built from its actual past poses
  (the same functions as the dataset: `scene.history_times`, `scene.local_history`,
  `trajectory.history_bins`), and the planner plans; between ticks the controller follows the
  latest plan. Planning takes no simulated time (the sim waits for the planner), so latency
  shows in the report, not in the driving. (`drive` is the loop itself, whatever the plans come
  from: `ros_link` feeds it from the running node, where latency does cost simulated time and
  the handover waits for the node's first plan.)

The world's actors follow their scripted motions (they do not react to the planner's ego); the
scripted driver's own run over the whole episode is kept as the reference for progress.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..planner import Planner, plan_problem
from ..scenarios.coc import decision_from_coc
from ..scenarios.ego import SIM_DT, EgoTrack, simulate_ego
from ..scenarios.events import T0, World, build_world
from ..scenarios.render import DEFAULT_CAMERAS, Renderer
from ..scenarios.scene import frame_times, history_times, local_history
from ..trajectory import FUTURE_STEPS, history_bins
from .controller import TrackedPlan, track
from .geometry import plan_path_in_world, route_position
from .vehicle import VehicleState, step

DEFAULT_DURATION_S = 10.0
DEFAULT_PLAN_RATE_HZ = 2.0  # the node's plan_rate_hz default
MAX_SPEED_MPS = 90.0  # the node's max_speed_mps default: plans stepping further are dropped, as the node drops them


class ClosedLoopError(RuntimeError):
    """An episode could not be driven (no plan arrived, the node failed); the message says why."""


@dataclass
class EpisodeConfig:
    duration_s: float = DEFAULT_DURATION_S  # closed-loop seconds after start_s
    plan_rate_hz: float = DEFAULT_PLAN_RATE_HZ
    start_s: float = T0  # when the planner takes over from the world's scripted driver

    @property
    def plan_every(self) -> int:
        """Simulation steps between planning ticks."""
        return max(int(round(1.0 / (self.plan_rate_hz * SIM_DT))), 1)


@dataclass
class PlanRecord:
    """One planning tick: what the planner was given and what it answered."""

    t: float
    origin: tuple[float, float, float]  # the ego's world pose at t: the plan's t0 frame
    speed: float
    coc: str
    coc_ids: list[int]
    decision: str | None  # `decision_from_coc` of the CoC
    trajectory_xy: np.ndarray  # [64, 2] in the t0 frame
    controls: np.ndarray  # [64, 2] its (acceleration, curvature)
    world_path: np.ndarray  # [65, 2] the same in the world, the ego first
    latency_ms: float  # wall time of Planner.plan
    timings_ms: dict
    stats: dict
    rejected: str | None = None  # why the node would not have published it (then the previous plan stays)
    received_t: float | None = None  # through ROS: the simulated time the plan reached the simulator
    pose_error_m: float | None = None  # through ROS: the node's pose at t0 vs the simulator's


@dataclass
class Episode:
    """Everything that happened: the ego's state at every SIM_DT step from t = 0 and the plans."""

    seed: int
    event: str
    decision: str  # the world's primary decision for this scenario
    world: World
    reference: EgoTrack  # the world's scripted driver over the same span
    start_index: int  # the first step the planner drove
    t: np.ndarray
    x: np.ndarray
    y: np.ndarray
    yaw: np.ndarray
    v: np.ndarray
    accel: np.ndarray  # applied over the step that ends here (0 at t = 0)
    s: np.ndarray  # arc length along the route
    offset: np.ndarray  # lateral offset from the centre of lane 0, left positive
    plans: list[PlanRecord] = field(default_factory=list)

    def same_driving(self, other: "Episode") -> bool:
        """Bit-for-bit equal states and plans (the losslessness check between decoding modes)."""
        states = all(np.array_equal(getattr(self, k), getattr(other, k)) for k in ("x", "y", "yaw", "v", "accel"))
        plans = len(self.plans) == len(other.plans) and all(
            a.coc_ids == b.coc_ids and np.array_equal(a.trajectory_xy, b.trajectory_xy)
            for a, b in zip(self.plans, other.plans))
        return states and plans

    def first_difference(self, other: "Episode") -> str:
        """Where two episodes first part (for the error message when they should not)."""
        for i, (a, b) in enumerate(zip(self.plans, other.plans)):
            if a.coc_ids != b.coc_ids:
                return f"plan {i} (t={a.t:.2f} s): CoC {a.coc!r} vs {b.coc!r}"
            if not np.array_equal(a.trajectory_xy, b.trajectory_xy):
                gap = float(np.abs(a.trajectory_xy - b.trajectory_xy).max())
                return f"plan {i} (t={a.t:.2f} s): same CoC, trajectories differ by up to {gap:.3g} m"
        differs = np.nonzero((self.x != other.x) | (self.y != other.y) | (self.v != other.v))[0]
        return f"state at t={self.t[differs[0]]:.2f} s" if len(differs) else "identical"


def plan_seed(episode_seed: int, tick: int) -> int:
    """The planner's seed at one tick: sampled modes draw fresh noise every tick, reproducibly."""
    return (episode_seed * 1_000_003 + tick) % 2**31


class PlanSource(Protocol):
    """Where the plans come from: called at every step i once the ego's states up to step i are
    logged, it returns the plans that reached the driver by then (none at most steps)."""

    def sense(self, i: int, log: dict[str, np.ndarray]) -> list[PlanRecord]: ...


class InProcessPlanner:
    """The planner called in this process at every planning tick from the start on; the
    simulation waits for it, so its latency shows in the report, not in the driving."""

    def __init__(self, planner: Planner, world: World, renderer: Renderer, seed: int, config: EpisodeConfig):
        self.planner, self.world, self.renderer, self.seed, self.config = planner, world, renderer, seed, config
        self.start = int(round(config.start_s / SIM_DT))
        self.ticks = 0

    def sense(self, i: int, log: dict[str, np.ndarray]) -> list[PlanRecord]:
        if i < self.start or (i - self.start) % self.config.plan_every:
            return []
        self.ticks += 1
        return [_plan_tick(self.planner, self.world, self.renderer, log, i, self.seed, self.ticks - 1)]


def run_episode(planner: Planner, seed: int, event: str | None = None, config: EpisodeConfig | None = None,
                renderer: Renderer | None = None) -> Episode:
    """Drive one seeded episode of `event` (None: the seed's own draw) with `planner` as it is
    configured (decoder, sampling, expert steps: see `modes`)."""
    config = config or EpisodeConfig()
    vision = planner.target.config.vision
    renderer = renderer or Renderer(DEFAULT_CAMERAS, vision.image_width, vision.image_height)
    world = build_world(np.random.default_rng(seed), event)
    return drive(world, seed, config, InProcessPlanner(planner, world, renderer, seed, config))


def drive(world: World, seed: int, config: EpisodeConfig, source: PlanSource) -> Episode:
    """The closed loop: the world's scripted driver drives until the start and then until the
    first plan has arrived (the handover), the controller follows the latest plan from then on."""
    start = int(round(config.start_s / SIM_DT))
    steps = start + int(round(config.duration_s / SIM_DT))
    reference = simulate_ego(world.route, world.plan, world.s0, world.v0, steps * SIM_DT)
    t = np.arange(steps + 1) * SIM_DT
    log = {k: np.zeros(steps + 1) for k in ("x", "y", "yaw", "v", "accel", "s", "offset")}
    _copy_reference(log, reference, 0)

    plans: list[PlanRecord] = []
    tracked: TrackedPlan | None = None
    state, handover = None, None
    for i in range(steps):
        for record in source.sense(i, log):
            plans.append(record)
            if record.rejected is None:
                tracked = TrackedPlan.from_plan(record.t, record.origin, record.speed, record.trajectory_xy,
                                                record.controls)
            elif tracked is None and i >= start:  # nothing usable yet: stand on the brakes
                tracked = _stand_still(record.t, record.origin)
        if i < start or tracked is None:  # the scripted driver still drives
            _copy_reference(log, reference, i + 1)
            continue
        if state is None:
            handover = i
            state = VehicleState(log["x"][i], log["y"][i], log["yaw"][i], log["v"][i],
                                 _initial_curvature(reference, i))
        command = track(tracked, state, t[i])
        state, applied = step(state, command.accel, command.curvature, SIM_DT, command.hold)
        log["x"][i + 1], log["y"][i + 1], log["yaw"][i + 1], log["v"][i + 1] = state.x, state.y, state.yaw, state.v
        log["accel"][i + 1] = applied
        log["s"][i + 1], log["offset"][i + 1] = route_position(world.route, state.x, state.y, log["s"][i])
    if handover is None:
        raise ClosedLoopError(f"no plan reached the simulator in {config.duration_s:g} s after the start "
                              f"({len(plans)} plan(s) before it): the planner never took over")
    return Episode(seed, world.event, world.primary, world, reference, handover, t, **log, plans=plans)


def _copy_reference(log: dict[str, np.ndarray], reference: EgoTrack, i: int) -> None:
    """The scripted driver's state at step i into the log."""
    for k in ("x", "y", "yaw", "v", "s", "offset"):
        log[k][i] = getattr(reference, k)[i]
    log["accel"][i] = (reference.v[i] - reference.v[i - 1]) / SIM_DT if i else 0.0


def scripted_episode(seed: int, event: str | None = None, config: EpisodeConfig | None = None) -> Episode:
    """The episode the world's own scripted driver drives (IDM with the scenario's knowledge):
    the baseline that shows what the metrics give a driver that does everything right."""
    config = config or EpisodeConfig()
    world = build_world(np.random.default_rng(seed), event)
    start = int(round(config.start_s / SIM_DT))
    steps = start + int(round(config.duration_s / SIM_DT))
    track = simulate_ego(world.route, world.plan, world.s0, world.v0, steps * SIM_DT)
    accel = np.concatenate([[0.0], np.diff(track.v) / SIM_DT])
    return Episode(seed, world.event, world.primary, world, track, start, track.t, track.x, track.y, track.yaw,
                   track.v, accel, track.s, track.offset)


def _plan_tick(planner: Planner, world: World, renderer: Renderer, log: dict, i: int, seed: int,
               tick: int) -> PlanRecord:
    """Render, build the history and plan at step i, as the node would at that instant."""
    t0 = i * SIM_DT
    origin = (float(log["x"][i]), float(log["y"][i]), float(log["yaw"][i]))
    frames = []
    for t in frame_times(t0):
        k = int(round(t / SIM_DT))
        frames.append(renderer.render(world, (log["x"][k], log["y"][k], log["yaw"][k]), log["s"][k], t))
    images = np.stack(frames, axis=1)  # [cameras, frames, H, W, 3], as scene.make_scene stacks them
    past = np.array([int(round(t / SIM_DT)) for t in history_times(t0)])
    history_xyz = local_history(np.column_stack([log["x"][past], log["y"][past]]), origin)
    speed = float(log["v"][i])
    planner.seed = plan_seed(seed, tick)
    clock = time.perf_counter()
    result = planner.plan(images, history_bins(history_xyz), speed)
    latency_ms = (time.perf_counter() - clock) * 1e3
    xy = np.asarray(result.trajectory_xy, dtype=np.float64)
    return PlanRecord(t0, origin, speed, result.coc, list(result.coc_ids), decision_from_coc(result.coc), xy,
                      np.asarray(result.controls, dtype=np.float64), plan_path_in_world(origin, xy),
                      latency_ms, dict(result.timings_ms), dict(result.stats),
                      rejected=plan_problem(result, MAX_SPEED_MPS))


def _stand_still(t0: float, origin: tuple[float, float, float]) -> TrackedPlan:
    """The fallback before any plan was published: stay where you are."""
    path = np.tile(origin[:2], (FUTURE_STEPS + 1, 1))
    return TrackedPlan(t0, path, np.zeros(FUTURE_STEPS + 1), np.full(FUTURE_STEPS, -3.0))


def _initial_curvature(reference: EgoTrack, i: int) -> float:
    """The scripted driver's path curvature at step i (so a mid-turn handover keeps steering)."""
    v = 0.5 * (reference.v[i] + reference.v[i - 1])
    if i == 0 or v < 0.3:
        return 0.0
    yaw_step = np.angle(np.exp(1j * (reference.yaw[i] - reference.yaw[i - 1])))
    return float(yaw_step / (v * SIM_DT))
