"""The closed loop through ROS 2 (`chain-spec-sim --ros`): the real `chain_spec_node` drives.

The simulator plays the car's drivers: it publishes /clock, nav_msgs/Odometry (every 20 ms step)
and raw camera frames (sensor_msgs/Image, bgr8, at the 10 Hz instants) on simulated time, paced
to the wall clock by `realtime_factor`, and follows the trajectories the node publishes
(~/trajectory for the path, ~/plan_info for t0, the pose it planned from and the controls). So
the loop exercises what in-process episodes skip: the node's subscriptions and guards, its time
alignment (frames nearest the 10 Hz instants, the ego history interpolated from odometry) and
its latency, which costs simulated time here as on a car: a plan reaches the controller
latency x realtime_factor after its t0 and is followed from where the car is by then.

Each episode runs on a timeline of its own (`EPISODE_GAP_S` after the previous one), which the
node takes for a clock jump and starts afresh. Plans are therefore not bit-identical between
modes here (the arrival times differ); `cli` compares ROS-mode twins by their score
distributions.
"""
from __future__ import annotations

import json
import queue
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import NS
from ..data.bag import CLOCK_TOPIC, EPOCH_NS, ODOM_TOPIC
from ..node_config import NODE_NAME
from ..scenarios.coc import decision_from_coc
from ..scenarios.ego import SIM_DT
from ..scenarios.events import World, build_world
from ..scenarios.render import Camera, Renderer
from ..trajectory import STEP_SECONDS
from .episode import ClosedLoopError, Episode, EpisodeConfig, PlanRecord, drive
from .geometry import plan_path_in_world
from .modes import Mode

CAMERA_EVERY = int(round(STEP_SECONDS / SIM_DT))  # camera frames at 10 Hz: every 5th step
EPISODE_GAP_S = 100.0  # simulated seconds between episodes: a new timeline for the node
READY_MARKER = "planning at"  # the node's last start-up line


def raw_camera_topic(camera: str) -> str:
    return f"/cameras/{camera}/image_raw"


def node_arguments(cameras: list[str], parameters: dict[str, object]) -> list[str]:
    """`--ros-args` for a chain_spec_node that listens to the simulator: simulated time, raw
    frames on the simulator's topics, plus `parameters` (models, backend, the mode's decoding)."""
    values = {"use_sim_time": True, "image_transport": "raw", "cameras": list(cameras),
              "camera_topics": [raw_camera_topic(c) for c in cameras], "odom_topic": ODOM_TOPIC, **parameters}
    args = ["--ros-args"]
    for name, value in values.items():
        text = ("[" + ",".join(f'"{v}"' for v in value) + "]" if isinstance(value, list)
                else str(value).lower() if isinstance(value, bool) else str(value))
        args += ["-p", f"{name}:={text}"]
    return args


@dataclass
class ReceivedPlan:
    t0_ns: int
    path_xy: np.ndarray  # [64, 2] from ~/trajectory, in the t0 frame
    info: dict  # ~/plan_info


class RosLink:
    """The simulator's side of DDS on a helper node (`replay.fixtures.spinning_node`): publishers
    of /clock, odometry and one raw image topic per camera; subscriptions to the node's
    ~/trajectory and ~/plan_info, paired by their t0 stamp into `ReceivedPlan`s."""

    def __init__(self, node, cameras: list[str], node_name: str = NODE_NAME):
        from nav_msgs.msg import Odometry, Path
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import Image
        from std_msgs.msg import String

        self.Clock, self.Odometry, self.Image = Clock, Odometry, Image
        self.clock = node.create_publisher(Clock, CLOCK_TOPIC, 10)
        self.odometry = node.create_publisher(Odometry, ODOM_TOPIC, 50)
        self.images = {c: node.create_publisher(Image, raw_camera_topic(c), 10) for c in cameras}
        self.received: queue.Queue[ReceivedPlan] = queue.Queue()
        self._paths: dict[int, np.ndarray] = {}
        self._infos: dict[int, dict] = {}
        self._lock = threading.Lock()  # the halves arrive on the executor thread
        node.create_subscription(Path, f"/{node_name}/trajectory", self._on_path, 10)
        node.create_subscription(String, f"/{node_name}/plan_info", self._on_info, 10)

    def connected(self) -> bool:
        """Whether the node subscribes to every topic of the link yet (discovery is done)."""
        return all(p.get_subscription_count() > 0 for p in (self.clock, self.odometry, *self.images.values()))

    # -- outgoing

    @staticmethod
    def _stamp(stamp, ns: int) -> None:
        stamp.sec, stamp.nanosec = ns // NS, ns % NS

    def publish_clock(self, ns: int) -> None:
        message = self.Clock()
        self._stamp(message.clock, ns)
        self.clock.publish(message)

    def publish_odometry(self, ns: int, x: float, y: float, yaw: float, speed: float) -> None:
        message = self.Odometry()
        self._stamp(message.header.stamp, ns)
        message.header.frame_id, message.child_frame_id = "odom", "base_link"
        message.pose.pose.position.x, message.pose.pose.position.y = float(x), float(y)
        orientation = message.pose.pose.orientation
        orientation.z, orientation.w = float(np.sin(yaw / 2)), float(np.cos(yaw / 2))
        message.twist.twist.linear.x = float(speed)
        self.odometry.publish(message)

    def publish_frames(self, ns: int, frames: np.ndarray) -> None:
        """One bgr8 frame [H, W, 3] per camera, in the order the link was given the cameras."""
        for publisher, frame in zip(self.images.values(), frames):
            message = self.Image()
            self._stamp(message.header.stamp, ns)
            message.header.frame_id = "camera"
            message.height, message.width = frame.shape[:2]
            message.encoding, message.step = "bgr8", frame.shape[1] * 3
            message.data = np.ascontiguousarray(frame).tobytes()
            publisher.publish(message)

    # -- incoming (executor thread)

    def _on_path(self, message) -> None:
        ns = message.header.stamp.sec * NS + message.header.stamp.nanosec
        xy = np.array([[p.pose.position.x, p.pose.position.y] for p in message.poses], dtype=np.float64)
        self._pair(ns, path=xy)

    def _on_info(self, message) -> None:
        info = json.loads(message.data)
        self._pair(int(info["t0_ns"]), info=info)

    def _pair(self, ns: int, path: np.ndarray | None = None, info: dict | None = None) -> None:
        with self._lock:
            if path is not None:
                self._paths[ns] = path
            if info is not None:
                self._infos[ns] = info
            if ns in self._paths and ns in self._infos:
                self.received.put(ReceivedPlan(ns, self._paths.pop(ns), self._infos.pop(ns)))

    def reset(self) -> None:
        """Forget every plan and unpaired half received so far."""
        with self._lock:
            self._paths.clear()
            self._infos.clear()
            self.take()

    def take(self) -> list[ReceivedPlan]:
        plans = []
        while True:
            try:
                plans.append(self.received.get_nowait())
            except queue.Empty:
                return plans


class RosPlanSource:
    """`episode.PlanSource` through the node: at every step, wait for that step's wall-clock
    instant, publish the ego's odometry (and camera frames at the 10 Hz instants) and /clock,
    and hand back the plans the node published meanwhile."""

    def __init__(self, link: RosLink, world: World, renderer: Renderer, config: EpisodeConfig, epoch_ns: int,
                 realtime_factor: float, decoding: str):
        self.link, self.world, self.renderer, self.config = link, world, renderer, config
        self.epoch_ns, self.realtime_factor, self.decoding = epoch_ns, realtime_factor, decoding
        self._wall0 = None
        link.reset()  # a late plan of the previous episode belongs to another timeline

    def sense(self, i: int, log: dict[str, np.ndarray]) -> list[PlanRecord]:
        t = i * SIM_DT
        ns = self.epoch_ns + int(round(t * NS))
        if self._wall0 is None:  # a new timeline: the clock jumps first, so the first frames are not "ahead" of it
            self._wall0 = time.monotonic()
            self.link.publish_clock(ns)
        delay = self._wall0 + t / self.realtime_factor - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self.link.publish_odometry(ns, log["x"][i], log["y"][i], log["yaw"][i], log["v"][i])
        if i % CAMERA_EVERY == 0:
            self.link.publish_frames(ns, self.renderer.render(self.world, (log["x"][i], log["y"][i], log["yaw"][i]),
                                                              log["s"][i], t))
        self.link.publish_clock(ns)
        return [self._record(plan, t, log) for plan in self.link.take() if self.epoch_ns <= plan.t0_ns <= ns]

    def _record(self, plan: ReceivedPlan, now: float, log: dict[str, np.ndarray]) -> PlanRecord:
        info = plan.info
        if info["decoding"] != self.decoding:  # an attached node configured otherwise: never mislabel a run
            raise ClosedLoopError(f"chain_spec_node decodes {info['decoding']}, the mode asks for {self.decoding}")
        t0 = (plan.t0_ns - self.epoch_ns) / NS
        origin = tuple(float(v) for v in info["pose"])
        k = int(round(t0 / SIM_DT))
        pose_error = float(np.hypot(origin[0] - log["x"][k], origin[1] - log["y"][k]))
        xy = plan.path_xy
        return PlanRecord(t0, origin, float(info["speed"]), info["coc"], list(info["coc_ids"]),
                          decision_from_coc(info["coc"]), xy, np.asarray(info["controls"], dtype=np.float64),
                          plan_path_in_world(origin, xy), float(info["planning_ms"]),
                          dict(info["timings_ms"]), dict(info["stats"]), received_t=now, pose_error_m=pose_error)


def episode_epoch_ns(index: int, config: EpisodeConfig) -> int:
    """Where episode `index` starts on the simulated clock: each on its own timeline."""
    return EPOCH_NS + int(round(index * (config.start_s + config.duration_s + EPISODE_GAP_S) * NS))


class RosDriver:
    """Episodes driven by chain_spec_node over DDS. `launch` (default): one node per mode, in a
    child process on this driver's ROS_DOMAIN_ID, with the mode's parameters; otherwise the
    node already running on `domain` is driven as it is configured (its decoding is checked
    against the mode on every plan)."""

    def __init__(self, models: Path, cameras: list[Camera], config: EpisodeConfig, node_parameters: dict[str, object],
                 domain: int, realtime_factor: float = 1.0, launch: bool = True, log_dir: Path | None = None,
                 ready_timeout_s: float = 300.0):
        from ..models.checkpoint import load_target_config

        vision = load_target_config(models / "target").vision
        self.renderer = Renderer(cameras, vision.image_width, vision.image_height)
        self.models, self.cameras, self.config = models, [c.name for c in cameras], config
        self.node_parameters = {"models_dir": str(models), "plan_rate_hz": config.plan_rate_hz, **node_parameters}
        self.domain, self.realtime_factor, self.launch = domain, realtime_factor, launch
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="chain_spec_sim_"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout_s = ready_timeout_s
        self._stack = ExitStack()
        self.link: RosLink | None = None
        self.episodes = 0

    def __enter__(self) -> "RosDriver":
        from ..replay.fixtures import spinning_node

        self.link = RosLink(self._stack.enter_context(spinning_node(self.domain, "chain_spec_sim")), self.cameras)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @contextmanager
    def mode(self, mode: Mode):
        """A node planning as `mode` (launched, or the attached one) for the episodes inside."""
        from ..replay.fixtures import NodeProcess, ros_env

        node = None
        if self.launch:
            args = node_arguments(self.cameras, {**self.node_parameters, **mode.node_parameters()})
            node = NodeProcess(args, ros_env(self.domain), self.log_dir / f"node_{mode.name}.log")
        try:
            self._wait_ready(node)
            decoding = "speculative" if mode.speculative else "target-only"
            yield lambda seed, event: self._episode(seed, event, decoding)
        except BaseException:
            if node is not None:
                node.stop()
            raise
        if node is not None and node.stop() != 0:
            raise ClosedLoopError(f"chain_spec_node ({mode.name}) exited with {node.process.returncode}; "
                                  f"see {node.log_path}")

    def _wait_ready(self, node) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while node is not None and READY_MARKER not in node.output():
            if not node.alive() or time.monotonic() > deadline:
                tail = "\n".join(node.output().splitlines()[-5:])
                raise ClosedLoopError(f"chain_spec_node did not start ({node.log_path}):\n{tail}")
            time.sleep(0.1)
        while not self.link.connected():
            if node is not None and not node.alive():
                raise ClosedLoopError(f"chain_spec_node exited; see {node.log_path}")
            if time.monotonic() > deadline:
                raise ClosedLoopError(f"no chain_spec_node subscribes to {CLOCK_TOPIC}, {ODOM_TOPIC} and "
                                   f"{', '.join(raw_camera_topic(c) for c in self.cameras)} on ROS_DOMAIN_ID "
                                   f"{self.domain} (run it with {' '.join(node_arguments(self.cameras, {}))})")
            time.sleep(0.05)

    def _episode(self, seed: int, event: str | None, decoding: str) -> Episode:
        world = build_world(np.random.default_rng(seed), event)
        epoch = episode_epoch_ns(self.episodes, self.config)
        source = RosPlanSource(self.link, world, self.renderer, self.config, epoch, self.realtime_factor, decoding)
        self.episodes += 1
        return drive(world, seed, self.config, source)
