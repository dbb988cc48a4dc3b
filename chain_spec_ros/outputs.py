"""Plan results and node state -> ROS 2 messages. The node's outgoing half of `sensing.py`.

Message types are imported lazily (`ros_types`) so that tools and tests can import the plain
helpers without rclpy. Everything the planner publishes is stamped with the input t0 in the
configured frame (consumers see how stale a plan is).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constants import NS, PERCENTILES
from .node_config import NodeConfig
from .planner import PlanResult
from .sensing import REJECTION_COUNTERS, RESIZED, SensorFrame
from .trajectory import STEP_SECONDS
from .worker import TickStats


def ros_types() -> dict[str, Any]:
    """The message classes the node publishes and subscribes to."""
    from builtin_interfaces.msg import Duration, Time
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from geometry_msgs.msg import Point, PoseStamped
    from nav_msgs.msg import Odometry, Path
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import ColorRGBA, Header, String
    from visualization_msgs.msg import Marker, MarkerArray

    return dict(Duration=Duration, Time=Time, DiagnosticArray=DiagnosticArray, DiagnosticStatus=DiagnosticStatus,
                KeyValue=KeyValue, Point=Point, PoseStamped=PoseStamped, Odometry=Odometry, Path=Path,
                CompressedImage=CompressedImage, Image=Image, ColorRGBA=ColorRGBA, Header=Header, String=String,
                Marker=Marker, MarkerArray=MarkerArray)


def time_msg(types, ns: int):
    return types["Time"](sec=int(ns // NS), nanosec=int(ns % NS))


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
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


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


def plan_info(frame: SensorFrame, result: PlanResult, token_texts: list[str], **extra) -> dict:
    """The ~/plan_info JSON of one plan: tokens and their source, timings, stats, input quality."""
    draft_k = int(result.stats.get("draft_k", 0))  # what this plan ran with (0: target only)
    return {
        "decoding": "speculative" if draft_k else "target-only", "draft_k": draft_k,
        "t0_ns": frame.t0_ns, "coc": result.coc, "coc_ids": [int(i) for i in result.coc_ids],
        "tokens": token_texts, "token_sources": list(result.token_sources), "timings_ms": dict(result.timings_ms),
        "stats": result.stats, "speed": frame.speed, "pose": list(frame.pose), "camera_skew_s": frame.camera_skew_s,
        "odom_lag_s": frame.odom_lag_s, "input_age_s": frame.input_age_s,
        "frame_stamps_ns": frame.frame_stamps_ns.tolist(),
        "controls": np.asarray(result.controls, dtype=np.float64).tolist(),  # what a controller can follow
        "trajectory_samples_xy": None if result.samples_xy is None else np.round(result.samples_xy, 3).tolist(),
        **extra,
    }


def latency_series(result: PlanResult, plan_ms: float, overhead_ms: float, conversion_ms: float) -> dict[str, float]:
    """The values one plan adds to the latency window: each stage's time, the node's overhead
    (conversion, assembly, message building, JSON and publishing), tau and the other stats."""
    stats = numeric_items(result.stats)
    total = plan_ms + overhead_ms
    return {**numeric_items(result.timings_ms), "plan": plan_ms, "node_overhead": overhead_ms,
            "conversion": conversion_ms, "planning_total": total,
            "overhead_share_pct": 100.0 * overhead_ms / max(total, 1e-9),
            "tau": stats.get("tau", 1.0), "drafted_share": stats.get("drafted_share", 0.0),
            **{f"stats.{k}": v for k, v in stats.items() if k not in ("tau", "drafted_share")}}


def plan_messages(types, frame: SensorFrame, result: PlanResult, cfg: NodeConfig) -> tuple:
    """(~/coc String, ~/trajectory Path, ~/markers MarkerArray) for one plan."""
    header = types["Header"](stamp=time_msg(types, frame.t0_ns), frame_id=cfg.frame_id)
    xy = np.asarray(result.trajectory_xy, dtype=np.float64).reshape(-1, 2)
    path = types["Path"](header=header)
    poses = []
    for i, ((x, y), yaw) in enumerate(zip(xy, trajectory_yaws(xy))):
        pose = types["PoseStamped"]()
        pose.header.stamp = time_msg(types, frame.t0_ns + int(round((i + 1) * STEP_SECONDS * NS)))
        pose.header.frame_id = cfg.frame_id
        pose.pose.position.x, pose.pose.position.y = float(x), float(y)
        pose.pose.orientation.z, pose.pose.orientation.w = math.sin(yaw / 2), math.cos(yaw / 2)
        poses.append(pose)
    path.poses = poses

    lifetime = types["Duration"](sec=int(cfg.marker_lifetime_s), nanosec=int((cfg.marker_lifetime_s % 1.0) * 1e9))
    Marker = types["Marker"]
    line = Marker(header=header, ns="chain_spec/trajectory", id=0, type=Marker.LINE_STRIP, action=Marker.ADD,
                  frame_locked=True, lifetime=lifetime)
    line.pose.orientation.w = 1.0
    line.scale.x = cfg.marker_line_width
    line.color = types["ColorRGBA"](r=0.1, g=0.85, b=0.3, a=1.0)
    line.points = [types["Point"](x=0.0, y=0.0, z=0.05)] + [types["Point"](x=float(x), y=float(y), z=0.05)
                                                            for x, y in xy]
    samples = []  # the other expert draws, thinner and fainter than the published one
    for i, sample in enumerate([] if result.samples_xy is None else result.samples_xy[1:]):
        marker = Marker(header=header, ns="chain_spec/trajectory_samples", id=i, type=Marker.LINE_STRIP,
                        action=Marker.ADD, frame_locked=True, lifetime=lifetime)
        marker.pose.orientation.w = 1.0
        marker.scale.x = cfg.marker_line_width / 2
        marker.color = types["ColorRGBA"](r=0.1, g=0.6, b=0.9, a=0.6)
        marker.points = [types["Point"](x=0.0, y=0.0, z=0.04)] + [types["Point"](x=float(x), y=float(y), z=0.04)
                                                                  for x, y in sample]
        samples.append(marker)
    text = Marker(header=header, ns="chain_spec/coc", id=1, type=Marker.TEXT_VIEW_FACING, action=Marker.ADD,
                  frame_locked=True, lifetime=lifetime, text=result.coc)
    text.pose.position.x, text.pose.position.z = 4.0, 3.0
    text.pose.orientation.w = 1.0
    text.scale.z = cfg.marker_text_size
    text.color = types["ColorRGBA"](r=1.0, g=1.0, b=1.0, a=1.0)
    return types["String"](data=result.coc), path, types["MarkerArray"](markers=[line, text, *samples])


@dataclass
class NodeState:
    """What /diagnostics reports, gathered by the node at publishing time."""

    name: str
    backend: str
    backend_requested: str
    backend_fallback: str
    decoding: str
    models_dir: str
    ticks: TickStats
    latency: dict[str, dict[str, float]]
    last_stats: dict[str, float]
    counters: dict[str, int]
    reasons: dict[str, str]
    input_ages_s: dict[str, float]
    staleness_s: float
    frame: SensorFrame | None
    node_values: dict[str, Any] = field(default_factory=dict)  # rate, executor load, clock, ...
    warnings: list[str] = field(default_factory=list)  # node-level problems (no /clock, a twin node)


class DiagnosticsBuilder:
    """Builds the DiagnosticArray (a planner status and an inputs status). Remembers which
    rejection counters it reported, so a status turns WARN only when new rejections arrived."""

    def __init__(self):
        self._reported: dict[str, int] = {}

    def build(self, types, state: NodeState, stamp_ns: int):
        KeyValue, Status = types["KeyValue"], types["DiagnosticStatus"]

        def kv(key, value) -> Any:
            if isinstance(value, float):
                value = f"{value:.4g}" if math.isfinite(value) else "nan"
            return KeyValue(key=key, value=str(value))

        s, summary = state.ticks, state.latency
        planner_values = [kv("backend", state.backend), kv("backend_requested", state.backend_requested),
                          kv("backend_fallback", state.backend_fallback), kv("decoding", state.decoding),
                          kv("models_dir", state.models_dir), kv("plans", s.plans), kv("errors", s.errors),
                          kv("rejected_plans", s.rejected_plans), kv("last_error", s.last_error)]
        planner_values += [kv(key, value) for key, value in state.node_values.items()]
        for name, stats in sorted(summary.items()):
            if name in ("tau", "drafted_share", "overhead_share_pct") or name.startswith("stats."):
                continue
            planner_values += [kv(f"latency_{name}_p{p}_ms", stats[f"p{p}"]) for p in PERCENTILES]
        share = summary.get("overhead_share_pct")
        planner_values.append(kv("node_overhead_share_pct", share["mean"] if share else float("nan")))
        for name in ("tau", "drafted_share"):
            planner_values.append(kv(name, summary[name]["mean"] if name in summary else float("nan")))
        planner_values += [kv(f"stats.{name}", value) for name, value in sorted(state.last_stats.items())
                           if name not in ("tau", "drafted_share")]
        if s.consecutive_errors:
            level, message = Status.ERROR, f"planning failed: {s.last_error}"
        elif state.warnings:
            level, message = Status.WARN, "; ".join(state.warnings)
        elif s.plans == 0:
            level, message = Status.WARN, f"no plan yet: {s.last_skip_reason or 'waiting for the first tick'}"
        else:
            level, message = Status.OK, f"{s.plans} plans, {state.decoding} decoding"
        planner = Status(level=level, name=f"{state.name}: planner", message=message, hardware_id=state.backend,
                         values=planner_values)

        counters, reasons = state.counters, state.reasons
        input_values = [kv("ticks", s.ticks), kv("dropped_ticks", s.dropped), kv("skipped_ticks", s.skipped),
                        kv("last_skip_reason", s.last_skip_reason), kv("input_staleness_s", state.staleness_s),
                        kv("images_received", counters.get("images", 0)),
                        kv("odometry_received", counters.get("odometry", 0)), kv(RESIZED, counters.get(RESIZED, 0)),
                        kv("decimated", counters.get("decimated", 0))]
        input_values += [kv(f"age_{name}_s", age) for name, age in state.input_ages_s.items()]
        if state.frame is not None:
            input_values += [kv("camera_skew_s", state.frame.camera_skew_s), kv("odom_lag_s", state.frame.odom_lag_s),
                             kv("last_t0", f"{state.frame.t0:.3f}")]
        new_rejections = []
        for name in REJECTION_COUNTERS:
            count = counters.get(name, 0)
            input_values.append(kv(name, count))
            if name in reasons:
                input_values.append(kv(f"last_{name}", reasons[name]))
            if count > self._reported.get(name, 0):
                new_rejections.append(f"{name}: {reasons.get(name, '')}")
            self._reported[name] = count
        if new_rejections:
            level, message = Status.WARN, "; ".join(new_rejections)
        elif s.last_tick_skipped:
            level, message = Status.WARN, f"tick skipped: {s.last_skip_reason}"
        else:
            level, message = Status.OK, "inputs ok"
        inputs = Status(level=level, name=f"{state.name}: inputs", message=message, hardware_id=state.backend,
                        values=input_values)
        array = types["DiagnosticArray"](status=[planner, inputs])
        array.header.stamp = time_msg(types, stamp_ns)
        return array


def plan_info_message(types, info: dict):
    return types["String"](data=json.dumps(json_safe(info)))
