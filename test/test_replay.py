"""chain-spec-replay, chain-spec-report and the comma2k19 conversion.

The replay test plays a sqlite3 bag from a child process into this process (an isolated
ROS_DOMAIN_ID), checks that every message arrives byte for byte with /clock, and that what a
stand-in node publishes is recorded to MCAP.
"""
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chain_spec_ros.data.bag import CLOCK_TOPIC, ODOM_TOPIC, camera_topic, read_drive_bag, write_drive_bag
from chain_spec_ros.metrics import displacement_errors
from chain_spec_ros.replay import replay as replay_tool
from chain_spec_ros.replay import report as report_tool
from chain_spec_ros.scenarios.render import DEFAULT_CAMERAS
from chain_spec_ros.trajectory import STEP_SECONDS

NS = 1_000_000_000
COMMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "comma2k19"


def test_replay_reports_bad_arguments(tmp_path, capsys):
    assert replay_tool.main([str(tmp_path / "missing"), "--record", str(tmp_path / "out")]) == 2
    assert "bag not found" in capsys.readouterr().err
    bag = tmp_path / "bag"
    write_drive_bag(bag, 1.0, seed=1, progress=False)
    (tmp_path / "exists").mkdir()
    assert replay_tool.main([str(bag), "--record", str(tmp_path / "exists")]) == 2
    assert "exists" in capsys.readouterr().err
    assert replay_tool.main([str(bag), "--rate", "0"]) == 2
    (tmp_path / "junk").mkdir()
    assert replay_tool.main([str(tmp_path / "junk")]) == 2
    assert "cannot read the bag" in capsys.readouterr().err


def test_synthesised_clock_covers_the_bag():
    pytest.importorskip("rclpy")
    from rclpy.serialization import deserialize_message
    from rosgraph_msgs.msg import Clock

    start = 1_700_000_000 * NS
    clock = replay_tool.synthesise_clock([(start, "/odom", b""), (start + NS, "/odom", b"")])
    assert len(clock) == 101 and clock[0][1] == CLOCK_TOPIC
    last = deserialize_message(clock[-1][2], Clock)
    assert last.clock.sec * NS + last.clock.nanosec == start + NS


def test_replay_republishes_raw_messages_and_records_outputs(tmp_path):
    pytest.importorskip("rclpy")
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry, Path as PathMsg
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CompressedImage
    from std_msgs.msg import String
    from visualization_msgs.msg import MarkerArray

    from chain_spec_ros.replay.fixtures import ros_env, spinning_node

    bag, out = tmp_path / "drive_sqlite", tmp_path / "outputs"
    write_drive_bag(bag, 3.0, seed=4, storage="sqlite3", progress=False)
    domain = random.Random(os.getpid() * 31 + time.monotonic_ns()).randint(1, 101)
    received: dict[str, list] = {}
    qos = QoSProfile(depth=500, reliability=ReliabilityPolicy.RELIABLE)
    inputs = {CLOCK_TOPIC: Clock, ODOM_TOPIC: Odometry,
              **{camera_topic(c.name): CompressedImage for c in DEFAULT_CAMERAS}}
    with spinning_node(domain, "stand_in") as node:
        coc = node.create_publisher(String, "/chain_spec_node/coc", 10)
        for name, kind in (("trajectory", PathMsg), ("markers", MarkerArray), ("plan_info", String)):
            node.create_publisher(kind, f"/chain_spec_node/{name}", 10)
        node.create_publisher(DiagnosticArray, "/diagnostics", 10)

        def on_message(topic, raw):
            received.setdefault(topic, []).append(bytes(raw))
            if topic == camera_topic("front_wide"):
                coc.publish(String(data=f"frame {len(received[topic])}"))

        for topic, kind in inputs.items():
            node.create_subscription(kind, topic, lambda raw, topic=topic: on_message(topic, raw), qos, raw=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "chain_spec_ros.replay.replay", str(bag), "--record", str(out),
                                 "--rate", "4", "--wait-timeout", "30", "--settle", "0.5"],
                                env=ros_env(domain), capture_output=True, text=True, timeout=90)
        elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert "played" in result.stdout

    # Every message arrived unchanged, in order (reliable QoS, delivery awaited at the end).
    from rosbags.rosbag2 import Reader

    with Reader(bag) as reader:
        original: dict[str, list] = {}
        for connection, _, raw in reader.messages():
            original.setdefault(connection.topic, []).append(bytes(raw))
    for topic in inputs:
        got, sent = received.get(topic, []), original[topic]
        assert len(got) == len(sent), topic
        for a, b in zip(got, sent):  # the middleware may pad the CDR payload to 4 bytes
            assert a[: len(b)] == b and len(a) - len(b) < 4 and not any(a[len(b):]), topic
    assert elapsed < 30  # 3 s of drive at rate 4 (plus start-up and discovery)

    # The stand-in's answers were recorded, on bag time, and the source bag is named.
    recorded = read_drive_bag(out)
    answers = recorded["/chain_spec_node/coc"]
    assert len(answers) == len(original[camera_topic("front_wide")])
    assert [m.data for _, m in answers][:2] == ["frame 1", "frame 2"]
    stamps = [stamp for stamp, _ in answers]
    assert stamps == sorted(stamps) and stamps[0] >= 1_700_000_000 * NS
    assert set(recorded) >= {"/chain_spec_node/trajectory", "/diagnostics"}
    assert report_tool.source_bag(out) == bag.resolve()


# --- Report arithmetic ---------------------------------------------------------------------------------

def _straight_drive(speed=10.0, yaw=0.7, seconds=10.0, rate=50.0):
    t = np.arange(0, seconds, 1 / rate)
    return np.column_stack([t, 100 + speed * t * math.cos(yaw), -50 + speed * t * math.sin(yaw),
                            np.full_like(t, yaw), np.full_like(t, speed)])


def test_future_in_t0_frame():
    odometry = _straight_drive()
    truth, speed = report_tool.future_in_t0_frame(odometry, 2.0)
    assert speed == pytest.approx(10.0)
    np.testing.assert_allclose(truth[:, 0], 10.0 * STEP_SECONDS * np.arange(1, 65), atol=1e-9)
    np.testing.assert_allclose(truth[:, 1], 0.0, atol=1e-9)
    assert report_tool.future_in_t0_frame(odometry, 5.0)[0] is None  # the drive ends before t0+6.4 s


def test_displacement_errors():
    truth = np.zeros((64, 2))
    predicted = np.column_stack([np.zeros(64), np.arange(64) * 0.1])
    errors = displacement_errors(predicted, truth)
    assert errors["fde_6.4s"] == pytest.approx(6.3)
    assert errors["ade_1s"] == pytest.approx(np.arange(10).mean() * 0.1)


def test_projection_matches_the_renderer_camera():
    camera = DEFAULT_CAMERAS[0]
    width, height = 96, 48
    focal = camera.intrinsics(width, height)[0, 0]
    uv = report_tool.project_to_image(np.array([[11.5, 0.0], [11.5, 2.0], [0.0, 0.0]]), camera, width, height)
    assert uv[0] == pytest.approx([width / 2, height / 2 + focal * 1.5 / 10.0])
    assert uv[1, 0] < width / 2  # left of the centre line appears left in the image
    assert np.isnan(uv[2]).all()  # behind the camera


def test_report_errors(tmp_path, capsys):
    assert report_tool.main([str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


# --- comma2k19 --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not COMMA.is_dir(), reason=f"comma2k19 sample not found at {COMMA}")
def test_comma2k19_odometry_in_a_local_frame(tmp_path):
    from chain_spec_ros.replay.comma import load_odometry, write_comma_bag

    odometry = load_odometry(COMMA)
    t, x, y, yaw, speed = odometry[:, :5].T
    assert len(t) > 1000 and np.all(np.diff(t) > 0)
    assert np.median(np.diff(t)) == pytest.approx(0.05, abs=0.002)  # 20 Hz
    assert x[0] == y[0] == 0.0
    assert 12 < speed.mean() < 22  # highway, ~17 m/s
    path = np.hypot(np.diff(x), np.diff(y)).sum()
    assert path == pytest.approx(np.trapezoid(speed, t), rel=0.02)  # positions and speeds agree
    # The device's forward axis points along the track.
    track = np.arctan2(np.diff(y), np.diff(x))
    assert np.degrees(np.abs(np.angle(np.exp(1j * (yaw[1:] - track))))).mean() < 3.0

    summary = write_comma_bag(COMMA, tmp_path / "comma", seconds=3.0)
    messages = read_drive_bag(tmp_path / "comma")
    assert len(messages[ODOM_TOPIC]) == summary["counts"][ODOM_TOPIC] >= 60
    duration = summary["duration"]
    assert abs(len(messages[camera_topic("front_wide")]) - 10 * duration) <= 1
    assert abs(len(messages[CLOCK_TOPIC]) - 100 * duration) <= 1
