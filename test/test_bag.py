"""Round trips of simulated drive bags: rates, stamps, images, odometry continuity, determinism."""
import cv2
import numpy as np
import pytest

from chain_spec_ros.data.bag import (CLOCK_TOPIC, EPISODE_SECONDS, EPOCH_NS, ODOM_TOPIC, camera_topic,
                                     odometry_array, read_drive_bag, write_drive_bag)
from chain_spec_ros.scenarios.render import DEFAULT_CAMERAS

# Long enough to cross one episode boundary, where continuity could break.
SECONDS = EPISODE_SECONDS + 2.0
WIDTH, HEIGHT = 64, 32
RATES = {CLOCK_TOPIC: 100, ODOM_TOPIC: 50, **{camera_topic(c.name): 10 for c in DEFAULT_CAMERAS}}


def _write(tmp_path, seed, storage="mcap", name=None):
    out = tmp_path / (name or f"{storage}_{seed}")
    summary = write_drive_bag(out, SECONDS, seed, storage=storage, width=WIDTH, height=HEIGHT, progress=False)
    return summary, read_drive_bag(out)


def _stamp_ns(stamp) -> int:
    return stamp.sec * 10**9 + stamp.nanosec


@pytest.fixture(scope="module")
def drives(tmp_path_factory):
    """One bag per storage plus a rerun and a different seed, written once for all tests."""
    tmp = tmp_path_factory.mktemp("bags")
    return {
        "mcap": _write(tmp, 7, "mcap"),
        "sqlite3": _write(tmp, 7, "sqlite3"),
        "mcap_again": _write(tmp, 7, "mcap", name="again"),
        "other_seed": _write(tmp, 8, "mcap"),
    }


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_round_trip_counts_and_stamps(drives, storage):
    summary, messages = drives[storage]
    assert summary["storage"] == storage
    assert set(messages) == set(RATES) == set(summary["topics"])
    for topic, rate in RATES.items():
        stamps = np.array([stamp for stamp, _ in messages[topic]])
        assert abs(len(stamps) - rate * SECONDS) <= 1, topic
        assert summary["counts"][topic] == len(stamps)
        assert np.all(np.diff(stamps) > 0), topic
        assert stamps[0] == EPOCH_NS
    for topic in RATES:  # bag time equals the message's own time
        for stamp, message in messages[topic]:
            own = message.clock if topic == CLOCK_TOPIC else message.header.stamp
            assert _stamp_ns(own) == stamp


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_images_decode_to_configured_size(drives, storage):
    _, messages = drives[storage]
    for camera in DEFAULT_CAMERAS:
        for _, message in messages[camera_topic(camera.name)]:
            assert message.format == "jpeg"
            assert message.header.frame_id == f"{camera.name}_optical"
            image = cv2.imdecode(np.asarray(message.data, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (HEIGHT, WIDTH, 3)
    # A rendered road scene is not a flat colour.
    _, first = messages[camera_topic(DEFAULT_CAMERAS[0].name)][0]
    assert cv2.imdecode(np.asarray(first.data, np.uint8), cv2.IMREAD_COLOR).std() > 5


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_odometry_is_continuous(drives, storage):
    _, messages = drives[storage]
    odom = odometry_array(messages[ODOM_TOPIC])
    _, first = messages[ODOM_TOPIC][0]
    assert (first.header.frame_id, first.child_frame_id) == ("odom", "base_link")
    assert first.pose.covariance[0] > 0 and first.twist.covariance[0] > 0

    t, xy, speed = odom[:, 0], odom[:, 1:3], odom[:, 4]
    dt = np.diff(t)
    assert np.allclose(dt, 0.02, atol=1e-6)
    assert np.abs(np.diff(speed)).max() < 0.5
    steps = np.linalg.norm(np.diff(xy, axis=0), axis=1)
    assert np.all(steps <= np.maximum(speed[:-1], speed[1:]) * dt + 0.2)
    yaw_steps = np.abs(np.angle(np.exp(1j * np.diff(odom[:, 3]))))
    assert yaw_steps.max() < np.radians(5)
    # Over one second the pose moves as far as the reported speed says, boundary included:
    # a wrongly composed episode would teleport or stall here.
    moved = np.linalg.norm(xy[50:] - xy[:-50], axis=1)
    expected = np.array([speed[i:i + 51].mean() for i in range(len(speed) - 50)])
    # (Tolerance: noise, chord vs arc in turns, lane offset on curved roads.)
    assert np.all(np.abs(moved - expected) < 0.3 + 0.03 * expected)


def test_same_seed_same_messages_other_seed_differs(drives):
    _, first = drives["mcap"]
    _, again = drives["mcap_again"]
    _, sqlite = drives["sqlite3"]
    _, other = drives["other_seed"]
    odom = odometry_array(first[ODOM_TOPIC])
    assert np.array_equal(odom, odometry_array(again[ODOM_TOPIC]))
    assert np.array_equal(odom, odometry_array(sqlite[ODOM_TOPIC]))  # storage does not change content
    topic = camera_topic(DEFAULT_CAMERAS[0].name)
    assert all(np.array_equal(a.data, b.data) for (_, a), (_, b) in zip(first[topic], again[topic]))
    other_odom = odometry_array(other[ODOM_TOPIC])
    assert other_odom.shape == odom.shape and not np.allclose(other_odom[:, 1:], odom[:, 1:])


def test_rejects_unknown_storage(tmp_path):
    with pytest.raises(ValueError):
        write_drive_bag(tmp_path / "bag", 1.0, 0, storage="rosbag1", progress=False)
