"""Reliability of chain_spec_node under nominal, stressed, faulty and long-running input, and on shutdown.

    .venv/bin/python benchmarks/soak.py --json runs/soak.json --png runs/soak.png        # full run, ~15 min
    .venv/bin/python benchmarks/soak.py --stress-seconds 15 --soak-seconds 20             # short check, ~2 min
    .venv/bin/python benchmarks/soak.py --phases nominal,stress --backend torch

Every phase starts a fresh node (`python -m chain_spec_ros.node`, wall clock, output in
WORKDIR/<phase>.log) on an isolated DDS domain with discovery on this host only, and this
process publishes its sensors: two cameras (JPEG 96x48) and odometry, stamped with the live
ROS clock. Phases, in this order (`--phases` picks a subset):

- nominal  (--stress-seconds, 60 s): cameras 10 Hz, odometry 50 Hz;
- stress   (same duration): cameras 100 Hz, odometry 1 kHz; stress_plan_ratio = plans / nominal plans;
- faults   (--faults-seconds, 30 s, nominal rates): one bad message a second, round robin over
           FAULTS; each must raise its /diagnostics counter, planning must go on and no published
           trajectory may be non-finite or step more than 9 m;
- soak     (--soak-seconds, 600 s, nominal rates): RSS growth, crashes, errors;
- shutdown: SIGINT and SIGTERM while loading, idle and planning: exit 0 within 2 s, no traceback.

Per phase: publisher rates achieved, plans (~/plan_info received), ticks, planning latency
percentiles (plan_info planning_ms), node RSS every second (growth from 30 s after the first plan
to the end), counters, executor load, exit code and seconds to exit after SIGINT. Prints one
JSON object with a `verdict`; --json writes it, --png draws RSS and plans per 10 s window.
clean_exits covers the shutdown runs and every phase's final SIGINT; faults' planning_continued
means a plan rate at least 0.8 of the nominal phase's (or of --plan-rate without one).
A full run takes about 15 minutes (750 s of sensors, plus model loading for 10 node starts).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chain_spec_ros.constants import IMAGE_HEIGHT, IMAGE_WIDTH, NS, PERCENTILES  # noqa: E402
from chain_spec_ros.paths import default_models_dir  # noqa: E402
from chain_spec_ros.replay.fixtures import NodeProcess, jpeg_claiming, ros_env  # noqa: E402

CAMERA_TOPICS = ("/cameras/front_wide/image/compressed", "/cameras/front_tele/image/compressed")
ODOM_TOPIC = "/odom"
NODE = "/chain_spec_node"
PHASES = ("nominal", "stress", "faults", "soak", "shutdown")
COUNTERS = ("oversized_images", "nan_odometry", "implausible_odometry", "out_of_order", "outlier_stamps",
            "clock_jumps", "decode_errors", "wrong_encoding", "wrong_size", "frame_id_mismatch", "decimated", "resized")
MAX_STEP_M = 9.0  # a trajectory step longer than this (90 m/s for 0.1 s) is a bad trajectory
RSS_BASELINE_S = 30.0  # RSS growth is measured from this long after the first plan
SPEED = 10.0  # m/s of the simulated drive
# Faults, in injection order: name -> the /diagnostics counter it must raise.
FAULTS = {"jpeg_bomb": "oversized_images", "nan_x": "nan_odometry", "speed_1e39": "implausible_odometry",
          "position_1e30": "implausible_odometry", "speed_minus_30": "implausible_odometry",
          "stamp_3s_past": "outlier_stamps", "stamp_5s_future": "outlier_stamps", "h264_format": "wrong_encoding",
          "corrupt_jpeg": "decode_errors", "png_1x1": "wrong_size", "child_frame_imu_link": "frame_id_mismatch"}
# Odometry faults replace one regular message: (stamp ns, x, speed) -> (stamp ns, x, speed, child_frame_id).
ODOM_FAULTS = {
    "nan_x": lambda s, x, v: (s, math.nan, v, "base_link"),
    "speed_1e39": lambda s, x, v: (s, x, 1e39, "base_link"),
    "position_1e30": lambda s, x, v: (s, 1e30, v, "base_link"),
    "speed_minus_30": lambda s, x, v: (s, x, -30.0, "base_link"),
    "stamp_3s_past": lambda s, x, v: (s - 3 * NS, x, v, "base_link"),
    "stamp_5s_future": lambda s, x, v: (s + 5 * NS, x, v, "base_link"),
    "child_frame_imu_link": lambda s, x, v: (s, x, v, "imu_link"),
}


def image_payloads() -> dict[str, tuple[str, bytes]]:
    """(format, data) of the regular camera frame ("frame") and of each image fault."""
    frame = np.zeros((IMAGE_HEIGHT, IMAGE_WIDTH, 3), np.uint8)
    frame[IMAGE_HEIGHT // 2:], frame[:, ::8] = 90, 200
    jpeg = cv2.imencode(".jpg", frame)[1].tobytes()
    cut = jpeg[:jpeg.index(b"\xff\xda")] + bytes(64)  # a valid 96x48 header, no scan data
    return {"frame": ("jpeg", jpeg), "jpeg_bomb": ("jpeg", jpeg_claiming(32768, 32768)), "h264_format": ("h264", jpeg),
            "corrupt_jpeg": ("jpeg", cut), "png_1x1": ("png", cv2.imencode(".png", frame[:1, :1])[1].tobytes())}


class SerializedTemplate:
    """One message serialized once; `bytes_with(stamp_ns, *floats)` patches the header stamp (the
    first CDR field, little-endian) and the float64 fields found by `float_fields` into a copy.
    Publishing these bytes (rclpy accepts serialized messages) costs the load generator a small
    fraction of building and serializing a message per publish, so at 1,200 messages a second the
    benchmark measures the node rather than its own Python publisher on the same cores."""

    def __init__(self, message, float_fields=()):
        from rclpy.serialization import serialize_message

        self.data = bytearray(serialize_message(message))
        if self.data[:2] != b"\x00\x01":
            raise ValueError("expected little-endian CDR")
        self.offsets = []
        for setter in float_fields:  # the byte offset of a float64 field: serialize a marker there
            setter(message, 1234.5678)
            marked = serialize_message(message)
            self.offsets.append(marked.index(struct.pack("<d", 1234.5678)))

    def bytes_with(self, stamp_ns: int, *values: float) -> bytes:
        data = bytearray(self.data)
        struct.pack_into("<iI", data, 4, *divmod(stamp_ns, NS))
        for offset, value in zip(self.offsets, values):
            struct.pack_into("<d", data, offset, value)
        return bytes(data)


class SensorPublisher:
    """This benchmark's sensors, published from one thread on the wall clock: both cameras at
    `camera_hz`, odometry at `odom_hz` (a straight drive at SPEED). With `faults`, one fault a
    second, round robin: an odometry fault replaces a regular message, an image fault goes to
    front_wide half-way between two frames. Fault stamps keep clear of the node's decimation
    (one message per 18 ms of odometry, per 45 ms of camera), so that every fault is examined."""

    def __init__(self, node, camera_hz: float, odom_hz: float, faults: bool = False):
        from nav_msgs.msg import Odometry
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CompressedImage

        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
        self.node, self.Odometry, self.Image = node, Odometry, CompressedImage
        self.publishers = {topic: node.create_publisher(CompressedImage, topic, qos) for topic in CAMERA_TOPICS}
        self.publishers[ODOM_TOPIC] = node.create_publisher(Odometry, ODOM_TOPIC, qos)
        self.camera_hz, self.odom_hz, self.faults = camera_hz, odom_hz, faults
        self.payloads = image_payloads()
        frame = self.Image(format=self.payloads["frame"][0], data=self.payloads["frame"][1])
        frame.header.frame_id = "camera"
        self.frame_template = SerializedTemplate(frame)
        odometry = self.Odometry()
        odometry.header.frame_id, odometry.child_frame_id = "odom", "base_link"
        odometry.pose.pose.orientation.w, odometry.twist.twist.linear.x = 1.0, SPEED
        self.odometry_template = SerializedTemplate(odometry, [lambda m, v: setattr(m.pose.pose.position, "x", v)])
        self.sent, self.faults_sent, self.seconds = Counter(), Counter(), 0.0
        self._last_stamp: dict[str, int] = {}  # of the regular messages, per topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._origin = self._now()

    def ready(self) -> bool:
        return all(p.get_subscription_count() > 0 for p in self.publishers.values())

    def rates(self) -> dict[str, float]:
        return {topic: round(self.sent[topic] / max(self.seconds, 1e-9), 1) for topic in self.publishers}

    def start(self) -> "SensorPublisher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def close(self) -> None:
        self.stop()
        for publisher in self.publishers.values():
            self.node.destroy_publisher(publisher)

    def _now(self) -> int:
        return self.node.get_clock().now().nanoseconds

    def _image(self, topic: str, stamp: int, name: str = "frame") -> None:
        if name == "frame":
            self.publishers[topic].publish(self.frame_template.bytes_with(stamp))
        else:
            fmt, data = self.payloads[name]
            message = self.Image(format=fmt, data=data)
            message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp, NS)
            message.header.frame_id = "camera"
            self.publishers[topic].publish(message)
        self.sent[topic] += 1

    def _odometry(self, fault: str | None = None) -> None:
        stamp = self._now()
        if fault:  # at least 19 ms after the last regular one: past the node's 50 Hz decimation
            stamp = max(stamp, self._last_stamp.get(ODOM_TOPIC, 0) + 19 * NS // 1000)
        x, speed, child = SPEED * (stamp - self._origin) / NS, SPEED, "base_link"
        if fault:
            stamp, x, speed, child = ODOM_FAULTS[fault](stamp, x, speed)
        else:
            self._last_stamp[ODOM_TOPIC] = stamp
            self.publishers[ODOM_TOPIC].publish(self.odometry_template.bytes_with(stamp, x))
            self.sent[ODOM_TOPIC] += 1
            return
        message = self.Odometry()
        message.header.stamp.sec, message.header.stamp.nanosec = divmod(stamp, NS)
        message.header.frame_id, message.child_frame_id = "odom", child
        message.pose.pose.position.x, message.pose.pose.orientation.w = x, 1.0
        message.twist.twist.linear.x = speed
        self.publishers[ODOM_TOPIC].publish(message)
        self.sent[ODOM_TOPIC] += 1

    def _run(self) -> None:
        camera_period, odom_period = 1.0 / self.camera_hz, 1.0 / self.odom_hz
        start = time.monotonic()
        due = {"camera": start, "odom": start, "image_fault": math.inf,
               "fault": start + 0.5 if self.faults else math.inf}  # due times (monotonic s)
        names, index, odom_fault, image_fault, last_camera = list(FAULTS), 0, None, None, start
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= due["camera"]:
                stamp, last_camera = self._now(), now
                for topic in CAMERA_TOPICS:
                    self._image(topic, stamp)
                    self._last_stamp[topic] = stamp
                due["camera"] = max(due["camera"] + camera_period, now - 0.05)  # late: catch up 50 ms at most
            if now >= due["odom"]:
                self._odometry(odom_fault)
                if odom_fault:
                    self.faults_sent[odom_fault], odom_fault = self.faults_sent[odom_fault] + 1, None
                due["odom"] = max(due["odom"] + odom_period, now - 0.05)
            if now >= due["image_fault"]:
                topic = CAMERA_TOPICS[0]
                self._image(topic, max(self._now(), self._last_stamp.get(topic, 0) + int(NS * camera_period / 2)),
                            image_fault)
                self.faults_sent[image_fault] += 1
                image_fault, due["image_fault"] = None, math.inf
            if now >= due["fault"]:
                name, index, due["fault"] = names[index % len(names)], index + 1, due["fault"] + 1.0
                if name in ODOM_FAULTS:
                    odom_fault = name
                else:  # half-way to the next frame
                    middle = last_camera + camera_period / 2
                    image_fault, due["image_fault"] = name, middle if middle > now else middle + camera_period
            time.sleep(max(0.0, min(due.values()) - time.monotonic()))
        self.seconds = time.monotonic() - start


class Listener:
    """This process's ROS node (on the benchmark's domain): hosts the sensor publishers and records
    ~/plan_info, ~/trajectory and /diagnostics of the node under test; `reset` starts a phase."""

    def __init__(self, domain: int):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from nav_msgs.msg import Path as PathMsg
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        self.rclpy, self.context = rclpy, rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node("soak_benchmark", context=self.context)
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(String, f"{NODE}/plan_info", self._on_plan_info, qos)
        self.node.create_subscription(PathMsg, f"{NODE}/trajectory", self._on_trajectory, qos)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, qos)
        self._lock = threading.Lock()
        self.reset()
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._spinner = threading.Thread(target=self.executor.spin, daemon=True)
        self._spinner.start()

    def reset(self) -> None:
        with self._lock:
            self.start = time.monotonic()
            self.plans: list[tuple[float, float]] = []  # (seconds since reset, planning_ms)
            self.trajectories, self.bad_trajectories, self.max_step_m = 0, 0, 0.0
            self.diagnostics: dict[str, str] = {}
            self.loads: list[float] = []

    def ready(self) -> bool:
        return self.node.count_publishers(f"{NODE}/plan_info") > 0

    def _on_plan_info(self, message) -> None:
        info = json.loads(message.data)
        with self._lock:
            self.plans.append((time.monotonic() - self.start, float(info.get("planning_ms", math.nan))))

    def _on_trajectory(self, message) -> None:
        xy = np.array([[p.pose.position.x, p.pose.position.y] for p in message.poses], dtype=np.float64)
        finite = bool(np.isfinite(xy).all()) and len(xy) > 0
        step = float(np.hypot(*np.diff(np.vstack([[0.0, 0.0], xy]), axis=0).T).max()) if finite else math.inf
        with self._lock:
            self.trajectories += 1
            self.bad_trajectories += int(not finite or step > MAX_STEP_M)
            self.max_step_m = max(self.max_step_m, step)

    def _on_diagnostics(self, message) -> None:
        values = {kv.key: kv.value for status in message.status if status.name.startswith("chain_spec_node")
                  for kv in status.values}
        with self._lock:
            self.diagnostics.update(values)
            if "executor_load_pct" in values:
                self.loads.append(float(values["executor_load_pct"]))

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)
        self._spinner.join(2.0)


# --- Measurements ------------------------------------------------------------------------------

def python_pid(pid: int) -> int:
    """The node's Python process: `pid` itself, or the first descendant running chain_spec_ros.node
    (when a bootstrapper runs Python as a child instead of exec'ing it)."""
    queue = [pid]
    while queue:
        current = queue.pop(0)
        try:
            if b"chain_spec_ros.node" in Path(f"/proc/{current}/cmdline").read_bytes():
                return current
            for task in Path(f"/proc/{current}/task").iterdir():
                queue += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return pid


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def percentiles(values, points=PERCENTILES) -> dict[str, float] | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return {f"p{p}": round(float(np.percentile(values, p)), 2) for p in points} if values else None


def number(text: str | None):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if not math.isfinite(value) else int(value) if value.is_integer() else value


def rss_growth(samples: list[tuple[float, float]], first_plan_s: float | None) -> tuple[float | None, float | None]:
    """(growth % from the sample RSS_BASELINE_S after the first plan, or the first one after the
    first plan when the phase is shorter, to the last sample; the baseline's time)."""
    samples = [(t, mb) for t, mb in samples if mb is not None]
    after = [(t, mb) for t, mb in samples if t >= (first_plan_s or 0.0)]
    if len(after) < 2:
        return None, None
    base = next(((t, mb) for t, mb in after if t >= (first_plan_s or 0.0) + RSS_BASELINE_S), after[0])
    return round(100.0 * (after[-1][1] - base[1]) / base[1], 2), round(base[0], 1)


def wait_for_log(node: NodeProcess, marker: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while marker not in node.output():
        if not node.alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_until(condition, timeout: float, node: NodeProcess | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (node is not None and not node.alive()):
            return False
        time.sleep(0.05)
    return True


def signal_and_wait(node: NodeProcess, number_: int, timeout: float = 10.0) -> tuple[int | None, float]:
    """(exit status or None if it did not exit in `timeout`, seconds from the signal to the exit)."""
    sent = time.monotonic()
    node.process.send_signal(number_)
    try:
        code = node.process.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
    return code, round(time.monotonic() - sent, 3)


def log_problems(text: str) -> dict[str, bool]:
    return {"traceback": "Traceback" in text, "error_lines": "[ERROR]" in text}


def tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- Phases ------------------------------------------------------------------------------------

def window_edges(seconds: float) -> np.ndarray:
    """Edges of the 10 s windows of a phase; the last window ends with the phase."""
    return np.append(np.arange(0.0, seconds, 10.0), seconds)


def node_args(settings: dict) -> list[str]:
    return ["--ros-args", "-p", f"models_dir:={settings['models']}", "-p", f"backend:={settings['backend']}",
            "-p", f"plan_rate_hz:={settings['plan_rate_hz']}", "-p", "diagnostics_rate_hz:=2.0"]


def run_phase(name: str, seconds: float, camera_hz: float, odom_hz: float, settings: dict, listener: Listener,
              env: dict, series: dict, faults: bool = False) -> dict:
    """One phase in a fresh node: sensors for `seconds`, then SIGINT. The node dying is recorded."""
    log = Path(settings["workdir"]) / f"{name}.log"
    result = {"seconds": seconds, "camera_hz": camera_hz, "odom_hz": odom_hz, "log": str(log), "crashed": False}
    node, sensors, samples = NodeProcess(node_args(settings), env, log), None, []
    try:
        if not wait_for_log(node, "planning at", settings["startup_timeout_s"]):
            result.update(started=False, crashed=not node.alive(), exit_code=node.process.poll(),
                          log_tail=tail(node.output()))
            return result
        sensors = SensorPublisher(listener.node, camera_hz, odom_hz, faults)
        if not wait_until(lambda: sensors.ready() and listener.ready(), 30.0, node):
            result.update(started=False, crashed=not node.alive(), log_tail=tail(node.output()))
            return result
        pid = python_pid(node.process.pid)
        listener.reset()
        sensors.start()
        with tqdm(total=int(seconds), desc=name, unit="s", file=sys.stderr, leave=False) as bar:
            while (elapsed := time.monotonic() - listener.start) < seconds:
                if not node.alive():
                    result.update(crashed=True, crashed_at_s=round(elapsed, 1))
                    break
                samples.append((round(elapsed, 2), rss_mib(pid)))
                bar.update(min(int(elapsed), int(seconds)) - bar.n)
                bar.set_postfix(plans=len(listener.plans), rss=f"{samples[-1][1] or 0:.0f}MiB")
                time.sleep(1.0 - elapsed % 1.0)
        sensors.stop()
        if not result["crashed"]:
            time.sleep(1.5)  # the last counts reach /diagnostics (2 Hz)
        result.update(summarise(listener, sensors, samples, seconds))
        if faults:
            result.update(fault_summary(sensors.faults_sent, result["counters"]))
        if node.alive():
            code, exit_s = signal_and_wait(node, signal.SIGINT)
            result.update(exit_code=code, exit_s=exit_s)
        else:
            result.update(exit_code=node.process.returncode, exit_s=None, log_tail=tail(node.output()))
    finally:
        if sensors is not None:
            sensors.close()
        node.stop()
        if samples:
            series[name] = {"rss": samples, "windows": window_edges(seconds),
                            "plans_per_10s": result.get("plans_per_10s")}
    result.update(log_problems(node.output()))
    exit_s = result.get("exit_s")
    result["clean_exit"] = (result.get("exit_code") == 0 and exit_s is not None and exit_s < 2.0
                            and not result["traceback"] and not result["error_lines"])
    return result


def summarise(listener: Listener, sensors: SensorPublisher, samples: list, seconds: float) -> dict:
    with listener._lock:
        plans, diag, loads = list(listener.plans), dict(listener.diagnostics), list(listener.loads)
        trajectories, bad, max_step = listener.trajectories, listener.bad_trajectories, listener.max_step_m
    times = [t for t, _ in plans]
    first = times[0] if times else None
    growth, baseline_s = rss_growth(samples, first)
    rss = [mb for _, mb in samples if mb is not None]
    return {
        "publisher_rates_hz": sensors.rates(), "plans": len(plans),
        "first_plan_s": round(first, 2) if first is not None else None,
        "plan_rate_achieved_hz": round((len(times) - 1) / (times[-1] - times[0]), 3) if len(times) > 2 else None,
        "plans_per_10s": np.histogram(times, bins=window_edges(seconds))[0].tolist(),  # the last may be shorter
        "planning_ms": percentiles([ms for _, ms in plans]),
        **{key: number(diag.get(key)) for key in ("ticks", "dropped_ticks", "skipped_ticks", "errors",
                                                  "rejected_plans")},
        "plans_diagnostics": number(diag.get("plans")),
        "plan_rate_achieved_hz_diagnostics": number(diag.get("plan_rate_achieved_hz")),
        "latency_planning_total_ms_diagnostics": {p: number(diag.get(f"latency_planning_total_{p}_ms"))
                                                  for p in ("p50", "p95", "p99")},
        "last_skip_reason": diag.get("last_skip_reason"), "last_error": diag.get("last_error") or None,
        "counters": {key: number(diag.get(key)) for key in COUNTERS},
        "executor_load_pct": {"p50": round(float(np.median(loads)), 1), "max": round(max(loads), 1)} if loads else None,
        "rss_mib": {"first": round(rss[0], 1), "peak": round(max(rss), 1), "last": round(rss[-1], 1),
                    "samples": len(rss)} if rss else None,
        "rss_growth_pct": growth, "rss_baseline_at_s": baseline_s,
        "trajectories": trajectories, "bad_trajectories": bad, "max_step_m": round(max_step, 2),
        "backend": diag.get("backend"), "backend_fallback": diag.get("backend_fallback") or None,
    }


def fault_summary(sent: Counter, counters: dict) -> dict:
    """Faults sent per kind and, per counter, the value expected (their sum) against the final one."""
    expected = Counter()
    for fault, counter in FAULTS.items():
        expected[counter] += sent[fault]
    by_counter = {c: {"expected": n, "value": counters.get(c), "ok": counters.get(c) == n} for c, n in expected.items()}
    return {"faults": {f: {"sent": sent[f], "counter": c, "counter_value": counters.get(c)} for f, c in FAULTS.items()},
            "fault_counters": by_counter, "all_faults_counted": all(v["ok"] for v in by_counter.values())}


def run_shutdown(settings: dict, listener: Listener, env: dict) -> dict:
    """SIGINT and SIGTERM while loading, idle and planning, each in a fresh node."""
    markers = {"loading": "loading the models", "idle": "planning at", "planning": "planning at"}
    runs = []
    cases = [(sig, state) for sig in ("SIGINT", "SIGTERM") for state in markers]
    for sig, state in tqdm(cases, desc="shutdown", file=sys.stderr, leave=False):
        log = Path(settings["workdir"]) / f"shutdown_{sig}_{state}.log"
        node, sensors, run = NodeProcess(node_args(settings), env, log), None, {"signal": sig, "state": state}
        try:
            if not wait_for_log(node, markers[state], settings["startup_timeout_s"]):
                run.update(error=f"'{markers[state]}' never appeared", exit_code=node.process.poll())
            else:
                if state == "planning":
                    sensors = SensorPublisher(listener.node, 10.0, 50.0)
                    wait_until(lambda: sensors.ready() and listener.ready(), 30.0, node)
                    listener.reset()
                    sensors.start()
                    if not wait_until(lambda: len(listener.plans) >= 3, 60.0, node):
                        run["error"] = "fewer than 3 plans before the signal"
                code, exit_s = signal_and_wait(node, getattr(signal, sig))
                run.update(exit_code=code, exit_s=exit_s)
        finally:
            if sensors is not None:
                sensors.close()
            node.stop()
        run.update(log_problems(node.output()), log=str(log))
        run["clean"] = (run.get("exit_code") == 0 and run.get("exit_s", math.inf) < 2.0 and "error" not in run
                        and not run["traceback"] and not run["error_lines"])
        runs.append(run)
    return {"runs": runs, "clean_exits": all(r["clean"] for r in runs),
            "max_exit_s": max((r.get("exit_s") or 0.0) for r in runs)}


# --- Report ------------------------------------------------------------------------------------

def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return {"nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_model": (models or [None])[0]}


def verdict(results: dict, ratio: float | None) -> dict:
    """The requirements, each None when the phases it needs did not run."""
    phases = [r for name, r in results.items() if name != "shutdown"]
    soak, faults, shutdown = results.get("soak"), results.get("faults"), results.get("shutdown")
    growth = soak.get("rss_growth_pct") if soak else None
    return {
        "rss_growth_below_5pct": None if growth is None else growth < 5.0,
        "zero_crashes": not any(r.get("crashed") for r in phases) if phases else None,
        "all_faults_counted": faults.get("all_faults_counted") if faults else None,
        "no_bad_trajectory": all(r.get("bad_trajectories", 0) == 0 for r in phases) if phases else None,
        "clean_exits": (all(r.get("clean_exit") for r in phases) and (shutdown is None or shutdown["clean_exits"])
                        if phases or shutdown else None),
        "stress_keeps_80pct": None if ratio is None else ratio >= 0.8,
    }


def draw(series: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7))
    for name, data in series.items():
        points = [(t, mb) for t, mb in data["rss"] if mb is not None]
        if points:
            top.plot(*zip(*points), label=name)
        if data["plans_per_10s"]:  # at each window's middle, a shorter last window scaled to 10 s
            edges = data["windows"]
            bottom.plot((edges[:-1] + edges[1:]) / 2, 10.0 * np.array(data["plans_per_10s"]) / np.diff(edges),
                        marker="o", label=name)
    top.set(title="chain_spec_node RSS", xlabel="seconds since the sensors started", ylabel="MiB")
    bottom.set(title="plans per 10 s window", xlabel="seconds since the sensors started", ylabel="plans")
    bottom.set_ylim(bottom=0)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    parser.add_argument("--stress-seconds", type=float, default=60.0, help="nominal and stress phases (s)")
    parser.add_argument("--faults-seconds", type=float, default=30.0)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--plan-rate", type=float, default=2.0, help="plan_rate_hz of the node")
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--domain", type=int, default=None, help="ROS_DOMAIN_ID (default: random in 1..101)")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds for a node to start planning")
    parser.add_argument("--workdir", default=None, help="node logs (default: a new temporary directory)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s): {', '.join(unknown)}")
    domain = args.domain if args.domain is not None else random.randint(1, 101)
    # The node runs from this checkout whatever the working directory; this process joins its domain.
    env = ros_env(domain, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    os.environ.update(env)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="chain_spec_soak_"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {"models": args.models, "backend": args.backend, "plan_rate_hz": args.plan_rate, "domain": domain,
                "stress_seconds": args.stress_seconds, "faults_seconds": args.faults_seconds,
                "soak_seconds": args.soak_seconds, "startup_timeout_s": args.startup_timeout,
                "workdir": str(workdir), "phases": [p for p in PHASES if p in phases]}
    plan = {"nominal": (args.stress_seconds, 10.0, 50.0, False), "stress": (args.stress_seconds, 100.0, 1000.0, False),
            "faults": (args.faults_seconds, 10.0, 50.0, True), "soak": (args.soak_seconds, 10.0, 50.0, False)}
    results, series, started = {}, {}, time.monotonic()
    listener = Listener(domain)
    try:
        for name in settings["phases"]:
            print(f"soak: phase {name}", file=sys.stderr, flush=True)
            if name == "shutdown":
                results[name] = run_shutdown(settings, listener, env)
                continue
            seconds, camera_hz, odom_hz, faults = plan[name]
            results[name] = run_phase(name, seconds, camera_hz, odom_hz, settings, listener, env, series, faults)
    finally:
        listener.close()
    ratio = None
    if "nominal" in results and "stress" in results and results["nominal"].get("plans"):
        ratio = round(results["stress"].get("plans", 0) / results["nominal"]["plans"], 3)
        results["stress"]["stress_plan_ratio"] = ratio
    if "faults" in results and "plan_rate_achieved_hz" in results["faults"]:
        reference = (results.get("nominal") or {}).get("plan_rate_achieved_hz") or args.plan_rate
        rate = results["faults"]["plan_rate_achieved_hz"] or 0.0
        results["faults"].update(plan_rate_vs_nominal=round(rate / reference, 3),
                                 planning_continued=rate >= 0.8 * reference)
    backends = [r.get("backend") for r in results.values() if r.get("backend")]
    report = {"machine": machine(), "backend": backends[0] if backends else None, "settings": settings,
              "wall_seconds": round(time.monotonic() - started, 1), "stress_plan_ratio": ratio, "phases": results,
              "verdict": verdict(results, ratio)}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        draw(series, args.png)
    failed = [name for name, ok in report["verdict"].items() if ok is False]
    if failed:
        print(f"soak: NOT met: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
