"""`chain_spec_node`: the planner as a ROS 2 node. A thin adapter: subscriptions feed
`sensing.SensorBuffers`, a timer hands the assembled `SensorFrame` to one planning worker, the
worker publishes the result.

    chain_spec_node [--config config/chain_spec.yaml] [--ros-args -p plan_rate_hz:=5.0 ...]

Inputs (sensor-data QoS: best effort, keep last): one sensor_msgs/CompressedImage (or raw
sensor_msgs/Image) topic per camera, nav_msgs/Odometry. Outputs, stamped with the input t0 in
`frame_id` (base_link):

    ~/coc          std_msgs/String           the chain of causation
    ~/trajectory   nav_msgs/Path             64 poses at 10 Hz (pose stamps t0+0.1 .. t0+6.4 s)
    ~/markers      visualization_msgs/MarkerArray   line strip + view-facing CoC text, frame_locked
    ~/plan_info    std_msgs/String (JSON)    per plan: tokens, their draft/target source, timings, stats
    /diagnostics   diagnostic_msgs/DiagnosticArray  latency p50/p95/p99 per stage, node overhead,
                   tau, drafted share, backend, dropped/skipped ticks, input staleness, errors

Threading: a SingleThreadedExecutor runs every callback (image and odometry conversion, the
timer, diagnostics); they are all short. The one long job, planning, runs on a dedicated worker
thread that the timer feeds with drop-if-busy semantics. A MultiThreadedExecutor would not help:
the planner is one stateful model instance (one KV cache), so plans cannot overlap anyway, and
more executor threads would only contend for the GIL with the callbacks. PyTorch releases the
GIL inside its kernels, so callbacks keep draining the DDS queues while a plan runs.

Parameters: every one is in config/chain_spec.yaml (see node_config.py for types and ranges).
The file named by --config (default: the package's) gives the values; ROS overrides
(`--ros-args -p` / `--params-file`) win over it. Everything is validated before the models load;
a bad parameter or a missing/mismatched model exits with a clear message and status 2. After
start-up nothing stops the node: a failed plan is logged, reported on /diagnostics (ERROR) and
the next tick plans again.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .paths import default_config_path
from .node_config import (FIELDS, NODE_NAME, ConfigError, NodeConfig, read_parameter_file,
                          validate)
from .planner import PlanResult
from .sensing import (NS, REJECTION_COUNTERS, RESIZED, InputError, SensingConfig, SensorBuffers, SensorFrame,
                      fit_size, image_from_compressed, image_from_raw, odometry_sample, stamp_ns)
from .trajectory import STEP_SECONDS

PERCENTILES = (50, 95, 99)


class StartupError(RuntimeError):
    """The node cannot start (configuration or models); the message says why."""


# --- Plain-Python helpers (no ROS) ------------------------------------------------------------------

class LatencyWindow:
    """The last `size` values of each named series, and their percentiles."""

    def __init__(self, size: int):
        self.size = size
        self._series: dict[str, deque] = {}
        self._lock = threading.Lock()

    def add(self, name: str, value: float) -> None:
        with self._lock:
            self._series.setdefault(name, deque(maxlen=self.size)).append(float(value))

    def summary(self) -> dict[str, dict[str, float]]:
        """name -> {p50, p95, p99, mean, last, n}."""
        with self._lock:
            series = {name: np.array(values) for name, values in self._series.items() if values}
        out = {}
        for name, values in series.items():
            stats = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
            stats.update(mean=float(values.mean()), last=float(values[-1]), n=len(values))
            out[name] = stats
        return out


class PlanWorker:
    """One planning thread. `submit` hands it a job unless it is busy (drop-if-busy)."""

    def __init__(self, work: Callable[[Any], None], name: str = "chain_spec_planner"):
        self._work = work
        self._condition = threading.Condition()
        self._job: Any = None
        self._busy = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        with self._condition:
            return self._busy

    def submit(self, job: Any) -> bool:
        with self._condition:
            if self._busy or self._stopping:
                return False
            self._job, self._busy = job, True
            self._condition.notify()
            return True

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._job is None and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                job, self._job = self._job, None
            try:
                self._work(job)  # must not raise; a safety net all the same
            except Exception:  # noqa: BLE001
                traceback.print_exc()
            finally:
                with self._condition:
                    self._busy = False

    def stop(self, timeout: float = 5.0) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)


@dataclass
class TickStats:
    ticks: int = 0
    dropped: int = 0  # the worker was busy
    skipped: int = 0  # inputs not usable; see last_skip_reason
    plans: int = 0  # plans published
    errors: int = 0  # plans that raised
    consecutive_errors: int = 0
    last_skip_reason: str = ""
    last_error: str = ""
    last_tick_skipped: bool = False


def numeric_items(mapping: dict | None) -> dict[str, float]:
    """The finite numeric entries of a mapping (stats may also hold lists and strings)."""
    out = {}
    for key, value in (mapping or {}).items():
        if isinstance(value, (bool, np.bool_)):
            continue
        if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def headline_stats(stats: dict[str, float]) -> tuple[float, float]:
    """(tau, drafted share) from a PlanResult's stats; target-only decoding is (1, 0)."""
    return stats.get("tau", 1.0), stats.get("drafted_share", 0.0)


def load_planner_for(config: NodeConfig):
    """The planner for `config` (backend, models directory, expert steps). Raises StartupError."""
    from .evaluate import load_planner
    from .paths import default_models_dir

    models = Path(config.models_dir).expanduser() if config.models_dir else default_models_dir()
    if not models.is_dir():
        raise StartupError(f"models directory not found: {models} (set the models_dir parameter)")
    drafter = config.drafter
    if drafter == "auto":
        draft = Path(config.draft_dir).expanduser() if config.draft_dir else models / "draft"
        drafter = "eagle" if draft.is_dir() and any(draft.iterdir()) else "none"
    kwargs: dict[str, Any] = dict(backend=config.backend, drafter=drafter, k=config.draft_k,
                                  expert_steps=config.expert_steps or None,
                                  draft_dir=str(Path(config.draft_dir).expanduser()) if config.draft_dir else None)
    try:
        planner = load_planner(models, **kwargs)
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        raise StartupError(f"cannot load the models from {models}: {error}") from None
    except Exception as error:  # noqa: BLE001 - e.g. a corrupt safetensors file
        raise StartupError(f"cannot load the models from {models}: {type(error).__name__}: {error}") from None
    planner.seed = config.seed
    return planner, models


def model_image_size(planner) -> tuple[int, int]:
    vision = planner.target.config.vision
    return vision.image_width, vision.image_height


def trajectory_yaws(xy: np.ndarray) -> np.ndarray:
    """Heading of each waypoint: the direction from the previous one (origin first)."""
    points = np.vstack([[0.0, 0.0], xy])
    step = np.diff(points, axis=0)
    yaw = np.arctan2(step[:, 1], step[:, 0])
    # Standing still: keep the last meaningful heading.
    still = np.hypot(step[:, 0], step[:, 1]) < 1e-3
    for i in np.flatnonzero(still):
        yaw[i] = yaw[i - 1] if i > 0 else 0.0
    return yaw


# --- The node --------------------------------------------------------------------------------------

def _ros():
    """ROS imports, kept in one place so that importing this module is cheap for tools."""
    import rclpy  # noqa: F401
    from builtin_interfaces.msg import Duration as DurationMsg
    from builtin_interfaces.msg import Time as TimeMsg
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from geometry_msgs.msg import Point, PoseStamped
    from nav_msgs.msg import Odometry, Path as PathMsg
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import ColorRGBA, Header, String
    from visualization_msgs.msg import Marker, MarkerArray

    return dict(DurationMsg=DurationMsg, TimeMsg=TimeMsg, DiagnosticArray=DiagnosticArray,
                DiagnosticStatus=DiagnosticStatus, KeyValue=KeyValue, Point=Point, PoseStamped=PoseStamped,
                Odometry=Odometry, Path=PathMsg, CompressedImage=CompressedImage, Image=Image, ColorRGBA=ColorRGBA,
                Header=Header, String=String, Marker=Marker, MarkerArray=MarkerArray)


def _time_msg(types, ns: int):
    return types["TimeMsg"](sec=int(ns // NS), nanosec=int(ns % NS))


def _declare_parameters(node, file_params: dict[str, Any]) -> dict[str, Any]:
    """Declare every NodeConfig parameter with the file's value as its default; ROS overrides
    (command line, --params-file) win. Returns the merged flat mapping to validate."""
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.parameter import Parameter

    overrides = dict(getattr(node, "_parameter_overrides", {}) or {})
    merged: dict[str, Any] = {}
    for name in overrides:
        if name not in FIELDS and name != "use_sim_time":
            merged[name] = overrides[name].value  # unknown: let validation report it
    for name, f in FIELDS.items():
        value = file_params.get(name, f.default_factory() if callable(f.default_factory) else f.default)
        if name == "use_sim_time":  # rclpy declared it already
            if name not in overrides and value != node.get_parameter(name).value:
                node.set_parameters([Parameter(name, value=value)])
            merged[name] = node.get_parameter(name).value
            continue
        descriptor = ParameterDescriptor(description=f.metadata["help"], dynamic_typing=True)
        merged[name] = node.declare_parameter(name, value, descriptor).value
    return merged


def _node_class():
    """The rclpy Node subclass, defined on first use so that importing this module does not
    import rclpy (tools and tests use its plain-Python helpers)."""
    from rclpy.node import Node
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy, DurabilityPolicy

    types = _ros()

    class _ChainSpecNode(Node):
        def __init__(self, config_path: Path | None, planner_loader=load_planner_for):
            super().__init__(NODE_NAME)
            log = self.get_logger()
            self._started = time.monotonic()
            # 1. Parameters: file, then ROS overrides, then validation.
            file_params: dict[str, Any] = {}
            try:
                if config_path is not None:
                    file_params = read_parameter_file(config_path, NODE_NAME)
                    validate(file_params, source=str(config_path))
                merged = _declare_parameters(self, file_params)
                self.config = validate(merged, source=f"parameters ({config_path or 'defaults'} + ROS overrides)")
            except ConfigError as error:
                raise StartupError(str(error)) from None
            cfg = self.config
            # 2. Models.
            torch.set_num_threads(cfg.torch_threads)
            self.planner, self.models_dir = planner_loader(cfg)
            self._tokenizer = self.planner.builder.tokenizer
            self.width, self.height = model_image_size(self.planner)
            self.decoding = "speculative" if self.planner.drafter is not None else "target-only"
            self.backend = self.planner.target.backend
            self.backend_fallback = self.planner.target.fallback_reason or ""
            if self.backend_fallback:
                log.warning(f"backend {cfg.backend} unavailable, running on {self.backend}: {self.backend_fallback}")
            log.info(f"models from {self.models_dir} ({self.backend}, {self.decoding}); images "
                     f"{self.width}x{self.height}; cameras {', '.join(cfg.cameras)}")
            # 3. Buffers and bookkeeping.
            self.buffers = SensorBuffers(SensingConfig(
                cameras=tuple(cfg.cameras), image_width=self.width, image_height=self.height,
                frame_tolerance_s=cfg.frame_tolerance_s, max_camera_skew_s=cfg.max_camera_skew_s,
                max_odom_staleness_s=cfg.max_odom_staleness_s, max_odom_gap_s=cfg.max_odom_gap_s,
                max_input_age_s=cfg.max_input_age_s, clock_jump_threshold_s=cfg.clock_jump_threshold_s,
                buffer_seconds=cfg.buffer_seconds, resize_images=cfg.resize_images))
            self.latency = LatencyWindow(cfg.diagnostics_window)
            self.tick_stats = TickStats()
            self._stats_lock = threading.Lock()
            self._convert_ms = 0.0  # message conversion time since the last plan
            self._convert_lock = threading.Lock()
            self._last_t0: int | None = None
            self._generation = self.buffers.generation
            self._last_frame: SensorFrame | None = None
            self._last_staleness = float("nan")
            self._last_stats: dict[str, float] = {}
            self._last_reported_rejections: dict[str, int] = {}
            self._warned: dict[str, float] = {}
            # 4. ROS wiring.
            sensor_qos = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=cfg.qos_depth,
                                    reliability=ReliabilityPolicy.BEST_EFFORT,
                                    durability=DurabilityPolicy.VOLATILE)
            image_type = types["CompressedImage"] if cfg.image_transport == "compressed" else types["Image"]
            self._decode = image_from_compressed if cfg.image_transport == "compressed" else image_from_raw
            self._inputs = [
                self.create_subscription(image_type, topic, partial(self._on_image, camera), sensor_qos)
                for camera, topic in zip(cfg.cameras, cfg.camera_topics)]
            self._inputs.append(
                self.create_subscription(types["Odometry"], cfg.odom_topic, self._on_odometry, sensor_qos))
            self.pub_coc = self.create_publisher(types["String"], "~/coc", 10)
            self.pub_path = self.create_publisher(types["Path"], "~/trajectory", 10)
            self.pub_markers = self.create_publisher(types["MarkerArray"], "~/markers", 10)
            self.pub_info = self.create_publisher(types["String"], "~/plan_info", 10)
            self.pub_diagnostics = self.create_publisher(types["DiagnosticArray"], "/diagnostics", 10)
            self._diag_lock = threading.Lock()
            self.worker = PlanWorker(self._plan)
            self.timer = self.create_timer(1.0 / cfg.plan_rate_hz, self._on_tick)
            self.diag_timer = self.create_timer(1.0 / cfg.diagnostics_rate_hz, self._publish_diagnostics)
            log.info(f"planning at {cfg.plan_rate_hz:g} Hz on {', '.join(cfg.camera_topics)} + {cfg.odom_topic}"
                     f" (use_sim_time={cfg.use_sim_time})")

        # -- helpers

        def _now_ns(self) -> int:
            return self.get_clock().now().nanoseconds

        def _warn(self, key: str, text: str, period: float = 5.0) -> None:
            now = time.monotonic()
            if now - self._warned.get(key, -1e9) >= period:
                self._warned[key] = now
                self.get_logger().warning(text)

        def _add_convert(self, start: float) -> None:
            with self._convert_lock:
                self._convert_ms += (time.perf_counter() - start) * 1e3

        # -- callbacks (executor thread; short)

        def _on_image(self, camera: str, message) -> None:
            start = time.perf_counter()
            try:
                image = self._decode(message)
                image, resized = fit_size(image, self.width, self.height, self.config.resize_images)
                if resized:
                    self.buffers.record(RESIZED, f"camera {camera}: images resized to {self.width}x{self.height}")
            except InputError as error:
                self.buffers.record(error.kind, f"camera {camera}: {error.reason}")
                self._warn(error.kind, f"camera {camera}: {error.reason}")
                return
            except Exception as error:  # noqa: BLE001 - never let a message kill the node
                self.buffers.record("decode_errors", f"camera {camera}: {type(error).__name__}: {error}")
                return
            finally:
                self._add_convert(start)
            reason = self.buffers.add_image(camera, stamp_ns(message.header.stamp), image)
            if reason:
                self._warn(f"image-{camera}", reason)

        def _on_odometry(self, message) -> None:
            start = time.perf_counter()
            try:
                sample = odometry_sample(message)
                reason = self.buffers.add_odometry(*sample)
            finally:
                self._add_convert(start)
            if reason:
                self._warn("odometry", reason)

        def _on_tick(self) -> None:
            now = self._now_ns()
            self.buffers.observe_clock(now)
            stats = self.tick_stats
            with self._stats_lock:
                stats.ticks += 1
            if self.worker.busy:
                with self._stats_lock:
                    stats.dropped += 1
                return
            if self.buffers.generation != self._generation:  # reset (clock jump): a new timeline
                self._generation, self._last_t0 = self.buffers.generation, None
            frame, reason = self.buffers.assemble(now_ns=now, last_t0_ns=self._last_t0)
            if frame is None:
                with self._stats_lock:
                    stats.skipped += 1
                    stats.last_skip_reason, stats.last_tick_skipped = reason, True
                self._warn("skip:" + reason.split(":")[0], f"tick skipped: {reason}", period=10.0)
                return
            with self._convert_lock:
                convert_ms, self._convert_ms = self._convert_ms, 0.0
            if self.worker.submit((frame, convert_ms)):
                self._last_t0 = frame.t0_ns
                with self._stats_lock:
                    stats.last_tick_skipped = False
            else:
                with self._stats_lock:
                    stats.dropped += 1

        # -- planning (worker thread)

        def _plan(self, job) -> None:
            frame, convert_ms = job
            start = time.perf_counter()
            try:
                result = self.planner.plan(frame.images, frame.history_tokens, frame.speed)
                plan_ms = (time.perf_counter() - start) * 1e3
                build_start = time.perf_counter()
                numeric = numeric_items(result.stats)
                info = self._plan_info(frame, result)
                messages = self._messages(frame, result)
                build_ms = (time.perf_counter() - build_start) * 1e3
                timings = numeric_items(result.timings_ms)
                overhead_ms = convert_ms + frame.assembly_ms + timings.get("prompt", 0.0) + build_ms
                total_ms = convert_ms + frame.assembly_ms + plan_ms + build_ms
                info.update(node_overhead_ms=overhead_ms, planning_ms=total_ms, convert_ms=convert_ms,
                            assembly_ms=frame.assembly_ms, build_ms=build_ms)
                messages.append((self.pub_info, types["String"](data=json.dumps(json_safe(info)))))
                for publisher, message in messages:
                    publisher.publish(message)
            except Exception as error:  # noqa: BLE001 - report, keep running
                with self._stats_lock:
                    self.tick_stats.errors += 1
                    self.tick_stats.consecutive_errors += 1
                    self.tick_stats.last_error = f"{type(error).__name__}: {error}"
                self.get_logger().error(f"planning failed at t0={frame.t0:.3f}: {type(error).__name__}: {error}\n"
                                        + traceback.format_exc(limit=4))
                self._publish_diagnostics()
                return
            self._last_staleness = (self._now_ns() - frame.t0_ns) / NS
            for name, value in timings.items():
                self.latency.add(name, value)
            self.latency.add("plan", plan_ms)
            self.latency.add("node_overhead", overhead_ms)
            self.latency.add("conversion", convert_ms + frame.assembly_ms)
            self.latency.add("planning_total", total_ms)
            self.latency.add("overhead_share_pct", 100.0 * overhead_ms / max(total_ms, 1e-9))
            tau, drafted = headline_stats(numeric)
            self.latency.add("tau", tau)
            self.latency.add("drafted_share", drafted)
            for name, value in numeric.items():
                if name not in ("tau", "drafted_share"):
                    self.latency.add(f"stats.{name}", value)
            with self._stats_lock:
                self.tick_stats.plans += 1
                self.tick_stats.consecutive_errors = 0
                self._last_frame, self._last_stats = frame, numeric

        def _plan_info(self, frame: SensorFrame, result: PlanResult) -> dict:
            ids = [int(i) for i in result.coc_ids]
            return {
                "t0_ns": frame.t0_ns, "coc": result.coc, "coc_ids": ids,
                "tokens": [self._tokenizer.decode([i]) for i in ids],
                "token_sources": list(result.token_sources), "timings_ms": dict(result.timings_ms),
                "stats": result.stats, "backend": self.backend, "decoding": self.decoding,
                "speed": frame.speed, "pose": list(frame.pose), "camera_skew_s": frame.camera_skew_s,
                "odom_lag_s": frame.odom_lag_s, "input_age_s": frame.input_age_s,
                "frame_stamps_ns": frame.frame_stamps_ns.tolist(),
            }

        def _messages(self, frame: SensorFrame, result) -> list:
            cfg = self.config
            header = types["Header"](stamp=_time_msg(types, frame.t0_ns), frame_id=cfg.frame_id)
            xy = np.asarray(result.trajectory_xy, dtype=np.float64).reshape(-1, 2)
            yaws = trajectory_yaws(xy)
            path = types["Path"](header=header)
            poses = []
            for i, ((x, y), yaw) in enumerate(zip(xy, yaws)):
                pose = types["PoseStamped"]()
                pose.header.stamp = _time_msg(types, frame.t0_ns + int(round((i + 1) * STEP_SECONDS * NS)))
                pose.header.frame_id = cfg.frame_id
                pose.pose.position.x, pose.pose.position.y = float(x), float(y)
                pose.pose.orientation.z, pose.pose.orientation.w = math.sin(yaw / 2), math.cos(yaw / 2)
                poses.append(pose)
            path.poses = poses

            lifetime = types["DurationMsg"](sec=int(cfg.marker_lifetime_s),
                                            nanosec=int((cfg.marker_lifetime_s % 1.0) * 1e9))
            Marker = types["Marker"]
            line = Marker(header=header, ns="chain_spec/trajectory", id=0, type=Marker.LINE_STRIP,
                          action=Marker.ADD, frame_locked=True, lifetime=lifetime)
            line.pose.orientation.w = 1.0
            line.scale.x = cfg.marker_line_width
            line.color = types["ColorRGBA"](r=0.1, g=0.85, b=0.3, a=1.0)
            line.points = [types["Point"](x=0.0, y=0.0, z=0.05)] + [
                types["Point"](x=float(x), y=float(y), z=0.05) for x, y in xy]
            text = Marker(header=header, ns="chain_spec/coc", id=1, type=Marker.TEXT_VIEW_FACING,
                          action=Marker.ADD, frame_locked=True, lifetime=lifetime, text=result.coc)
            text.pose.position.x, text.pose.position.z = 4.0, 3.0
            text.pose.orientation.w = 1.0
            text.scale.z = cfg.marker_text_size
            text.color = types["ColorRGBA"](r=1.0, g=1.0, b=1.0, a=1.0)
            markers = types["MarkerArray"](markers=[line, text])
            return [(self.pub_coc, types["String"](data=result.coc)), (self.pub_path, path),
                    (self.pub_markers, markers)]

        # -- diagnostics

        def _publish_diagnostics(self) -> None:
            try:
                with self._diag_lock:
                    self.pub_diagnostics.publish(self._diagnostics())
            except Exception as error:  # noqa: BLE001
                self._warn("diagnostics", f"could not publish diagnostics: {error}")

        def _diagnostics(self):
            KeyValue, Status = types["KeyValue"], types["DiagnosticStatus"]
            now = self._now_ns()
            with self._stats_lock:
                s = TickStats(**vars(self.tick_stats))
                frame, last_stats = self._last_frame, dict(self._last_stats)

            def kv(key, value) -> Any:
                if isinstance(value, float):
                    value = f"{value:.4g}" if math.isfinite(value) else "nan"
                return KeyValue(key=key, value=str(value))

            # Planner status: latency, acceptance, errors.
            summary = self.latency.summary()
            planner_values = [kv("backend", self.backend), kv("backend_requested", self.config.backend),
                              kv("backend_fallback", self.backend_fallback), kv("decoding", self.decoding),
                              kv("models_dir", str(self.models_dir)), kv("plans", s.plans), kv("errors", s.errors),
                              kv("last_error", s.last_error)]
            for name, stats in sorted(summary.items()):
                if name in ("tau", "drafted_share", "overhead_share_pct") or name.startswith("stats."):
                    continue
                for p in PERCENTILES:
                    planner_values.append(kv(f"latency_{name}_p{p}_ms", stats[f"p{p}"]))
            share = summary.get("overhead_share_pct")
            planner_values.append(kv("node_overhead_share_pct", share["mean"] if share else float("nan")))
            for name in ("tau", "drafted_share"):
                planner_values.append(kv(name, summary[name]["mean"] if name in summary else float("nan")))
            for name, value in sorted(last_stats.items()):
                if name not in ("tau", "drafted_share"):
                    planner_values.append(kv(f"stats.{name}", value))
            if s.consecutive_errors:
                level, message = Status.ERROR, f"planning failed: {s.last_error}"
            elif s.plans == 0:
                level, message = Status.WARN, f"no plan yet: {s.last_skip_reason or 'waiting for the first tick'}"
            else:
                level, message = Status.OK, f"{s.plans} plans, {self.decoding} decoding"
            planner = Status(level=level, name=f"{self.get_name()}: planner", message=message,
                             hardware_id=self.backend, values=planner_values)

            # Inputs status: ticks, staleness, rejected messages.
            counters = dict(self.buffers.counters)
            reasons = dict(self.buffers.last_reasons)
            input_values = [kv("ticks", s.ticks), kv("dropped_ticks", s.dropped), kv("skipped_ticks", s.skipped),
                            kv("last_skip_reason", s.last_skip_reason),
                            kv("input_staleness_s", self._last_staleness),
                            kv("images_received", counters.get("images", 0)),
                            kv("odometry_received", counters.get("odometry", 0)),
                            kv(RESIZED, counters.get(RESIZED, 0))]
            newest = self.buffers.newest_stamps()
            for name, stamp in newest.items():
                age = (now - stamp) / NS if stamp is not None else float("nan")
                input_values.append(kv(f"age_{name}_s", age))
            if frame is not None:
                input_values += [kv("camera_skew_s", frame.camera_skew_s), kv("odom_lag_s", frame.odom_lag_s),
                                 kv("last_t0", f"{frame.t0:.3f}")]
            new_rejections = []
            for name in REJECTION_COUNTERS:
                count = counters.get(name, 0)
                input_values.append(kv(name, count))
                if name in reasons:
                    input_values.append(kv(f"last_{name}", reasons[name]))
                if count > self._last_reported_rejections.get(name, 0):
                    new_rejections.append(f"{name}: {reasons.get(name, '')}")
                self._last_reported_rejections[name] = count
            if new_rejections:
                level, message = Status.WARN, "; ".join(new_rejections)
            elif s.last_tick_skipped:
                level, message = Status.WARN, f"tick skipped: {s.last_skip_reason}"
            else:
                level, message = Status.OK, "inputs ok"
            inputs = Status(level=level, name=f"{self.get_name()}: inputs", message=message,
                            hardware_id=self.backend, values=input_values)
            array = types["DiagnosticArray"](status=[planner, inputs])
            array.header.stamp = _time_msg(types, now)
            return array

        def close(self) -> None:
            self.worker.stop()

    return _ChainSpecNode


def create_node(config_path: Path | None, planner_loader=load_planner_for):
    return _node_class()(config_path, planner_loader)


def main(argv: list[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.utilities import remove_ros_args

    argv = list(sys.argv if argv is None else argv)
    parser = argparse.ArgumentParser(prog="chain_spec_node", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="ROS 2 parameter file (default: the package's config/chain_spec.yaml)")
    args = parser.parse_args(remove_ros_args(args=argv)[1:])
    config_path = Path(args.config) if args.config else default_config_path()
    if not config_path.is_file():
        if args.config:
            print(f"chain_spec_node: error: parameter file not found: {config_path}", file=sys.stderr)
            return 2
        config_path = None  # installed without its share directory: built-in defaults

    rclpy.init(args=argv)
    node = None
    try:
        node = create_node(config_path)
    except StartupError as error:
        print(f"chain_spec_node: error: {error}", file=sys.stderr, flush=True)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
