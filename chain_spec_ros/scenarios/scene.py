"""One training/test sample: a simulated scene seen at t0 by the cameras and the ego history."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..trajectory import (FUTURE_STEPS, HISTORY_STEPS, STEP_SECONDS, accel_curvature, history_bins, history_speeds,
                          to_local_frame)
from .coc import EgoState, compose, parse, speed_state
from .ego import EgoTrack, simulate_ego
from .events import T0, T_END, World, build_world
from .render import Renderer

NUM_FRAMES = 4  # per camera, at 10 Hz, the last one at t0
MIN_ROAD_SPAN = 3.0  # m: a history shorter than this shows no road shape
BEND_CURVATURE = 1 / 600  # 1/m: a history bending more than this is in a bend
TURN_CURVATURE = 1 / 40  # 1/m: and one this sharp that has turned TURN_HEADING is mid-turn
TURN_HEADING = 0.3  # rad (17 degrees)


@dataclass
class Scene:
    seed: int
    event: str
    primary: str
    longitudinal: str
    lateral: str
    images: np.ndarray  # uint8 [cameras, frames, H, W, 3], BGR
    history_xyz: np.ndarray  # [17, 3] poses t0-1.6 s .. t0 in the t0 frame
    history_tokens: np.ndarray  # [48] bin indices
    speed: float  # at t0, m/s
    future_xy: np.ndarray  # [64, 2] in the t0 frame
    future_yaw: np.ndarray  # [64]
    future_speed: np.ndarray  # [64]
    future_controls: np.ndarray  # [64, 2] (acceleration, curvature)
    coc_markup: str
    coc: str
    coc_char_labels: np.ndarray  # per character: 0 routine, 1 visual


def sample_track(track: EgoTrack, times: np.ndarray) -> np.ndarray:
    """Ego (x, y, yaw, speed, s) at the given times."""
    idx = np.array([track.index(t) for t in times])
    return np.stack([track.x[idx], track.y[idx], track.yaw[idx], track.v[idx], track.s[idx]], axis=1)


def road_shape(history_xyz: np.ndarray) -> tuple[str, str]:
    """The road shape the history shows, a key of `coc.ROAD_PHRASES` or '' when it is too short
    to show one, and the side it bends to ('left', 'right' or '')."""
    xy = history_xyz[:, :2]
    span = float(np.linalg.norm(xy[-1] - xy[0]))
    if span < MIN_ROAD_SPAN:
        return "", ""
    steps = np.diff(xy, axis=0)
    heading = np.unwrap(np.arctan2(steps[:, 1], steps[:, 0]))
    turned = heading[-1] - heading[0]
    side = "left" if turned > 0 else "right"
    if abs(turned) >= TURN_HEADING and abs(turned) / span >= TURN_CURVATURE:
        return "turn", side
    if abs(turned) / span > BEND_CURVATURE:
        return "bend", side
    return "straight", ""


def ego_state_from_history(history_xyz: np.ndarray, speed: float) -> EgoState:
    """Speed state and road shape as the history shows them (what the CoC's routine part says)."""
    return EgoState(speed_state(history_speeds(history_xyz), speed), speed, *road_shape(history_xyz))


def history_times(t0: float) -> np.ndarray:
    """The 17 history instants t0-1.6 s .. t0 (10 Hz, oldest first)."""
    return t0 - STEP_SECONDS * np.arange(HISTORY_STEPS, -1, -1)


def frame_times(t0: float) -> np.ndarray:
    """The NUM_FRAMES camera instants per camera, 10 Hz, the last one at t0 (oldest first)."""
    return t0 - STEP_SECONDS * np.arange(NUM_FRAMES - 1, -1, -1)


def local_history(world_xy: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    """History poses [17, 3] in the t0 frame from world (x, y) [17, 2] at `history_times`:
    planar (z = 0), as the dataset and the node give them; `history_bins` tokenises it.
    Shared by `make_scene` and the closed-loop simulator, so both build the history alike."""
    return np.column_stack([to_local_frame(world_xy, origin), np.zeros(len(world_xy))])


def make_scene(seed: int, renderer: Renderer | None = None, event: str | None = None, render: bool = True) -> Scene:
    """The scene of one seed; `render=False` skips the cameras (for text-only uses such as
    training the tokeniser) and leaves `images` empty."""
    rng = np.random.default_rng(seed)
    world: World = build_world(rng, event)
    track = simulate_ego(world.route, world.plan, world.s0, world.v0, T_END)
    origin = track.pose(T0)

    history = sample_track(track, history_times(T0))
    history_xyz = local_history(history[:, :2], origin)

    future_times = T0 + STEP_SECONDS * np.arange(0, FUTURE_STEPS + 1)
    future = sample_track(track, future_times)
    controls = accel_curvature(future[:, 3], future[:, 2])

    images = np.zeros((0,), np.uint8)
    if render:
        renderer = renderer or Renderer()
        frames = []
        for t in frame_times(T0):
            state = sample_track(track, [t])[0]
            frames.append(renderer.render(world, tuple(state[:3]), state[4], t))
        images = np.stack(frames, axis=1)  # [cameras, frames, H, W, 3]

    speed = float(future[0, 3])
    markup = compose(world.primary, world.lateral, world.cause, ego_state_from_history(history_xyz, speed), rng)
    coc, labels = parse(markup)
    return Scene(
        seed=seed,
        event=world.event,
        primary=world.primary,
        longitudinal=world.longitudinal or "",
        lateral=world.lateral,
        images=images,
        history_xyz=history_xyz.astype(np.float32),
        history_tokens=history_bins(history_xyz),
        speed=speed,
        future_xy=to_local_frame(future[1:, :2], origin).astype(np.float32),
        future_yaw=np.angle(np.exp(1j * (future[1:, 2] - origin[2]))).astype(np.float32),
        future_speed=future[1:, 3].astype(np.float32),
        future_controls=controls.astype(np.float32),
        coc_markup=markup,
        coc=coc,
        coc_char_labels=labels,
    )
