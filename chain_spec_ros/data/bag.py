"""A continuous simulated drive recorded as a rosbag2 bag (MCAP or SQLite3).

The ROS 2 node is exercised by replaying bags, so this module turns the scenario catalogue
into sensor streams that look like a real recording: JPEG camera frames at 10 Hz, noisy
odometry at 50 Hz and `/clock` at 100 Hz, all stamped with simulated time.

A drive is a chain of episodes. Each episode is one `build_world` scenario (with its random
event) simulated for `EPISODE_SECONDS` from its own start. The scenarios are laid out in
their own local coordinates, so each episode's ego track is re-expressed relative to its
start pose and composed onto the global pose where the previous episode ended. The next
world starts at the previous end speed, so odometry stays continuous across boundaries; only
the scenery (road, actors) changes abruptly there, which replay consumers must tolerate.

Everything random comes from one seed, and messages are written in a fixed order, so the
same seed always yields the same messages.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore
from tqdm import tqdm

from ..constants import IMAGE_HEIGHT, IMAGE_WIDTH
from ..scenarios.ego import SIM_DT, EgoTrack, simulate_ego
from ..scenarios.events import World, build_world
from ..scenarios.render import DEFAULT_CAMERAS, Renderer

EPOCH_NS = 1_700_000_000 * 10**9  # simulated time zero, a plausible wall-clock stamp
TICK_NS = 10_000_000  # 100 Hz, the /clock rate; the other rates are integer divisors of it
ODOM_EVERY, CAMERA_EVERY = 2, 10  # ticks: 50 Hz odometry, 10 Hz cameras
EPISODE_SECONDS = 8.0  # covers a scenario's event (at T0 = 2 s) and most of its aftermath
SPEED_RANGE = (0.0, 25.0)  # m/s; a world never starts outside this
WORLD_CANDIDATES = 6  # scenarios drawn per episode; the one whose own start speed fits best wins

# Odometry noise (1 sigma), roughly a good wheel/IMU odometry.
POSITION_SIGMA = 0.02  # m
YAW_SIGMA = math.radians(0.2)
SPEED_SIGMA = 0.05  # m/s
YAW_RATE_SIGMA = 0.005  # rad/s
FIXED_VARIANCE = 1e-6  # z, roll, pitch, lateral speed: constrained by planar motion, not unknown

ODOM_TOPIC, CLOCK_TOPIC = "/odom", "/clock"
ODOM_TYPE = "nav_msgs/msg/Odometry"
CLOCK_TYPE = "rosgraph_msgs/msg/Clock"
IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}


def camera_topic(name: str) -> str:
    return f"/cameras/{name}/image/compressed"


def ros2_typestore():
    """The Kilted message definitions (the distribution the node targets), or the newest
    ROS 2 store this `rosbags` version knows; the messages used here are identical in all."""
    store = getattr(Stores, "ROS2_KILTED", None)
    if store is None:
        store = [s for s in Stores if s.name.startswith("ROS2_")][-1]
    return get_typestore(store)


# --- Geometry ------------------------------------------------------------------------------------

def _compose(base: tuple[float, float, float], x, y, yaw):
    """Poses (x, y, yaw) given in the frame of `base` expressed in the frame `base` lives in."""
    bx, by, byaw = base
    c, s = math.cos(byaw), math.sin(byaw)
    return bx + c * x - s * y, by + s * x + c * y, byaw + yaw


def _relative_to_start(track: EgoTrack):
    """The track's poses in the frame of its first pose (so it can be re-anchored anywhere)."""
    x0, y0, yaw0 = track.x[0], track.y[0], track.yaw[0]
    c, s = math.cos(yaw0), math.sin(yaw0)
    dx, dy = track.x - x0, track.y - y0
    return c * dx + s * dy, -s * dx + c * dy, np.unwrap(track.yaw) - yaw0


def _wrap(angle):
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


# --- The drive -----------------------------------------------------------------------------------

class _Episode:
    """One simulated scenario, placed in the global odometry frame."""

    def __init__(self, world: World, start_time: float, start_pose, start_speed: float):
        world.v0 = float(np.clip(start_speed, *SPEED_RANGE))
        self.world, self.start_time = world, start_time
        self.track = simulate_ego(world.route, world.plan, world.s0, world.v0, EPISODE_SECONDS)
        lx, ly, lyaw = _relative_to_start(self.track)
        self.x, self.y, self.yaw = _compose(start_pose, lx, ly, lyaw)
        self.yaw_rate = np.gradient(np.unwrap(self.track.yaw), SIM_DT)

    def index(self, t: float) -> int:
        return int(round((t - self.start_time) / SIM_DT))

    def end_state(self):
        return (float(self.x[-1]), float(self.y[-1]), float(self.yaw[-1])), float(self.track.v[-1])


def _next_world(rng: np.random.Generator, speed: float | None) -> World:
    """A scenario that suits the current speed (any scenario for the first episode).

    Each builder lays out its event for its own start speed (stop lines at a comfortable
    braking distance, a lead at a sane gap), so of a few random draws the one closest to the
    current speed keeps the drive plausible instead of forcing an emergency stop when the ego
    arrives much faster than the scenario assumed."""
    if speed is None:
        return build_world(rng)
    worlds = [build_world(rng) for _ in range(WORLD_CANDIDATES)]
    return min(worlds, key=lambda world: abs(world.v0 - speed))


def _stamp(typestore, ns: int):
    return typestore.types["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)


def _header(typestore, ns: int, frame_id: str):
    return typestore.types["std_msgs/msg/Header"](stamp=_stamp(typestore, ns), frame_id=frame_id)


def _odometry(typestore, ns: int, episode: _Episode, i: int, noise: np.random.Generator):
    """An Odometry message at track sample i: global pose, body-frame twist, both noisy."""
    T = typestore.types
    x = episode.x[i] + noise.normal(0.0, POSITION_SIGMA)
    y = episode.y[i] + noise.normal(0.0, POSITION_SIGMA)
    yaw = float(_wrap(episode.yaw[i] + noise.normal(0.0, YAW_SIGMA)))
    speed = episode.track.v[i] + noise.normal(0.0, SPEED_SIGMA)
    yaw_rate = episode.yaw_rate[i] + noise.normal(0.0, YAW_RATE_SIGMA)
    pose_cov = np.diag([POSITION_SIGMA**2, POSITION_SIGMA**2, FIXED_VARIANCE, FIXED_VARIANCE, FIXED_VARIANCE,
                        YAW_SIGMA**2]).ravel()
    twist_cov = np.diag([SPEED_SIGMA**2, FIXED_VARIANCE, FIXED_VARIANCE, FIXED_VARIANCE, FIXED_VARIANCE,
                         YAW_RATE_SIGMA**2]).ravel()
    vector = T["geometry_msgs/msg/Vector3"]
    pose = T["geometry_msgs/msg/Pose"](
        position=T["geometry_msgs/msg/Point"](x=float(x), y=float(y), z=0.0),
        orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2)),
    )
    twist = T["geometry_msgs/msg/Twist"](linear=vector(x=float(speed), y=0.0, z=0.0),
                                         angular=vector(x=0.0, y=0.0, z=float(yaw_rate)))
    return T[ODOM_TYPE](
        header=_header(typestore, ns, "odom"),
        child_frame_id="base_link",
        pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=pose_cov),
        twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=twist_cov),
    )


def _compressed_image(typestore, ns: int, camera: str, image: np.ndarray, quality: int):
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {camera}")
    return typestore.types[IMAGE_TYPE](header=_header(typestore, ns, f"{camera}_optical"), format="jpeg",
                                       data=jpeg.ravel())


def write_drive_bag(out: str | Path, seconds: float, seed: int, storage: str = "mcap", width: int = IMAGE_WIDTH,
                    height: int = IMAGE_HEIGHT, jpeg_quality: int = 90, progress: bool = True) -> dict:
    """Record `seconds` of continuous simulated driving into a new bag directory `out`.

    `storage` is "mcap" or "sqlite3"; `out` must not exist yet (rosbags refuses to overwrite).
    Returns a summary: path, storage, duration, topics (name -> type), counts (name -> messages)
    and the scenario event of each episode.
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {sorted(STORAGES)}, not {storage!r}")
    typestore = ros2_typestore()
    world_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    world_rng, noise = np.random.default_rng(world_seed), np.random.default_rng(noise_seed)
    renderer = Renderer(DEFAULT_CAMERAS, width, height)
    cameras = [camera.name for camera in DEFAULT_CAMERAS]
    topics = {CLOCK_TOPIC: CLOCK_TYPE, ODOM_TOPIC: ODOM_TYPE, **{camera_topic(c): IMAGE_TYPE for c in cameras}}
    counts = dict.fromkeys(topics, 0)
    num_ticks = int(round(seconds * 1e9 / TICK_NS))
    ticks_per_episode = int(round(EPISODE_SECONDS * 1e9 / TICK_NS))
    num_episodes = math.ceil(num_ticks / ticks_per_episode)

    with Writer(Path(out), version=9, storage_plugin=STORAGES[storage]) as writer:
        connections = {topic: writer.add_connection(topic, msgtype, typestore=typestore)
                       for topic, msgtype in topics.items()}

        def write(topic: str, ns: int, message) -> None:
            writer.write(connections[topic], ns, typestore.serialize_cdr(message, topics[topic]))
            counts[topic] += 1

        pose, speed, events = (0.0, 0.0, 0.0), None, []
        for e in tqdm(range(num_episodes), desc="episodes", unit="ep", disable=not progress):
            world = _next_world(world_rng, speed)
            episode = _Episode(world, e * EPISODE_SECONDS, pose, world.v0 if speed is None else speed)
            pose, speed = episode.end_state()
            events.append(world.event)
            for tick in range(e * ticks_per_episode, min((e + 1) * ticks_per_episode, num_ticks)):
                ns = EPOCH_NS + tick * TICK_NS
                write(CLOCK_TOPIC, ns, typestore.types[CLOCK_TYPE](clock=_stamp(typestore, ns)))
                i = episode.index(tick * TICK_NS * 1e-9)
                if tick % ODOM_EVERY == 0:
                    write(ODOM_TOPIC, ns, _odometry(typestore, ns, episode, i, noise))
                if tick % CAMERA_EVERY == 0:
                    track = episode.track
                    frames = renderer.render(world, (track.x[i], track.y[i], track.yaw[i]), track.s[i], track.t[i])
                    for name, image in zip(cameras, frames):
                        write(camera_topic(name), ns, _compressed_image(typestore, ns, name, image, jpeg_quality))

    return {"path": str(out), "storage": storage, "duration": num_ticks * TICK_NS * 1e-9, "topics": topics,
            "counts": counts, "events": events}


# --- Reading back ---------------------------------------------------------------------------------

def read_drive_bag(path: str | Path) -> dict[str, list[tuple[int, object]]]:
    """Every message of a bag, deserialized: topic -> [(bag stamp in ns, message)] in bag order.

    Meant for tests and reports on short drives; it holds the whole bag in memory.
    """
    typestore = ros2_typestore()
    messages: dict[str, list[tuple[int, object]]] = {}
    with Reader(Path(path)) as reader:
        for connection in reader.connections:
            messages.setdefault(connection.topic, [])
        for connection, stamp, raw in reader.messages():
            message = typestore.deserialize_cdr(raw, connection.msgtype)
            messages[connection.topic].append((stamp, message))
    return messages


def odometry_array(messages: list[tuple[int, object]]) -> np.ndarray:
    """Odometry messages as float64 [N, 5]: header time in seconds since the epoch, x, y, yaw, speed."""
    rows = []
    for _, odom in messages:
        stamp, pose = odom.header.stamp, odom.pose.pose
        yaw = 2.0 * math.atan2(pose.orientation.z, pose.orientation.w)
        rows.append((stamp.sec + stamp.nanosec * 1e-9, pose.position.x, pose.position.y, float(_wrap(yaw)),
                     odom.twist.twist.linear.x))
    return np.array(rows, dtype=np.float64).reshape(-1, 5)
