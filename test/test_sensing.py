"""Sensor buffers without ROS: t0 choice, frame picking, odometry interpolation, every
rejection path and image conversion."""
import math
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from chain_spec_ros import sensing
from chain_spec_ros.sensing import (NS, InputError, SensingConfig, SensorBuffers, decode_compressed, decode_raw,
                                    fit_size, image_from_compressed, image_from_raw, interpolate_odometry,
                                    odometry_sample)
from chain_spec_ros.replay.fixtures import jpeg_claiming
from chain_spec_ros.trajectory import history_bins, to_local_frame

T_START = 1_700_000_000 * NS
W, H = 16, 8


def _frame(value: int) -> np.ndarray:
    return np.full((H, W, 3), value % 256, np.uint8)


def _buffers(**overrides) -> SensorBuffers:
    return SensorBuffers(SensingConfig(cameras=("a", "b"), image_width=W, image_height=H, **overrides))


def _pose(t: float, speed=10.0, yaw_rate=0.0, yaw0=0.5):
    """A unicycle at constant speed and yaw rate (exact closed form)."""
    yaw = yaw0 + yaw_rate * t
    if abs(yaw_rate) < 1e-12:
        return speed * t * math.cos(yaw0), speed * t * math.sin(yaw0), yaw
    r = speed / yaw_rate
    return r * (math.sin(yaw) - math.sin(yaw0)), -r * (math.cos(yaw) - math.cos(yaw0)), yaw


def _fill(buffers, seconds=2.5, odom_hz=50.0, camera_hz=10.0, lag=None, odom_offset=0.0, odom_until=None,
          **motion):
    """Drive for `seconds`; camera b may lag behind a by `lag` frames. Returns the last a stamp."""
    n_odom = int(seconds * odom_hz)
    for i in range(n_odom + 1):
        t = i / odom_hz + odom_offset
        if odom_until is not None and t > odom_until:
            break
        x, y, yaw = _pose(t, **motion)
        assert buffers.add_odometry(T_START + int(round(t * NS)), x, y, math.remainder(yaw, 2 * math.pi),
                                    motion.get("speed", 10.0)) is None
    n_cam = int(round(seconds * camera_hz))
    for i in range(n_cam + 1):
        stamp = T_START + int(round(i / camera_hz * NS))
        buffers.add_image("a", stamp, _frame(i))
        if lag is None or i <= n_cam - lag:
            buffers.add_image("b", stamp, _frame(100 + i))
    return T_START + int(round(n_cam / camera_hz * NS))


def test_frame_and_history_for_straight_motion():
    buffers = _buffers()
    last = _fill(buffers)
    frame, reason = buffers.assemble(now_ns=last + NS // 20)
    assert reason == "" and frame is not None
    assert frame.t0_ns == last
    assert frame.images.shape == (2, 4, H, W, 3)
    # Oldest frame first, at 10 Hz, ending at t0.
    assert list(frame.images[0, :, 0, 0, 0]) == [22, 23, 24, 25]
    assert list(frame.images[1, :, 0, 0, 0]) == [122, 123, 124, 125]
    np.testing.assert_array_equal(frame.frame_stamps_ns[0], last - np.array([3, 2, 1, 0]) * NS // 10)
    # 17 poses t0-1.6 .. t0, straight ahead in the t0 frame.
    expected_x = -10.0 * 0.1 * np.arange(16, -1, -1)
    np.testing.assert_allclose(frame.history_xyz[:, 0], expected_x, atol=1e-6)
    np.testing.assert_allclose(frame.history_xyz[:, 1:], 0.0, atol=1e-6)
    np.testing.assert_array_equal(frame.history_tokens, history_bins(frame.history_xyz))
    assert frame.speed == pytest.approx(10.0)
    assert frame.pose[2] == pytest.approx(0.5)
    assert frame.camera_skew_s == 0.0 and frame.odom_lag_s == pytest.approx(0.0)
    assert frame.input_age_s == pytest.approx(0.05)


def test_t0_is_the_oldest_newest_stamp():
    buffers = _buffers()
    last = _fill(buffers, lag=1)  # camera b is one frame behind
    frame, reason = buffers.assemble()
    assert reason == ""
    assert frame.t0_ns == last - NS // 10
    assert frame.camera_skew_s == pytest.approx(0.1)
    # Camera a's frames are picked at b's instants, not at its own newest.
    assert list(frame.images[0, :, 0, 0, 0]) == [21, 22, 23, 24]
    assert list(frame.images[1, :, 0, 0, 0]) == [121, 122, 123, 124]


def test_history_interpolation_on_a_curve_at_odd_rates():
    """Odometry at 33 Hz with a phase offset: interpolation must still land on the truth."""
    buffers = _buffers()
    motion = dict(speed=8.0, yaw_rate=0.4, yaw0=3.0)  # heading crosses +pi during the history
    last = _fill(buffers, odom_hz=33.0, odom_offset=0.013, **motion)
    frame, reason = buffers.assemble()
    assert reason == ""
    t0 = (last - T_START) / NS
    times = t0 - 0.1 * np.arange(16, -1, -1)
    poses = np.array([_pose(t, **motion) for t in times])
    truth = to_local_frame(poses[:, :2], tuple(poses[-1]))
    np.testing.assert_allclose(frame.history_xyz[:, :2], truth, atol=0.02)  # chord error at 33 Hz
    assert math.cos(frame.pose[2] - poses[-1, 2]) == pytest.approx(1.0, abs=1e-4)


def test_yaw_takes_the_shortest_arc():
    samples = np.array([[0.0, 0, 0, math.pi - 0.1, 1.0], [1.0, 0, 0, -math.pi + 0.1, 1.0]])
    yaw = interpolate_odometry(samples, np.array([0.5]))[0, 2]
    assert math.cos(yaw - math.pi) == pytest.approx(1.0)  # through pi, not through 0


def test_extrapolates_slightly_stale_odometry():
    buffers = _buffers()
    _fill(buffers, odom_until=2.4)  # newest odometry 0.1 s before t0
    frame, reason = buffers.assemble()
    assert reason == ""
    assert frame.odom_lag_s == pytest.approx(0.1, abs=1e-6)
    np.testing.assert_allclose(frame.history_xyz[:, 0], -1.0 * np.arange(16, -1, -1), atol=1e-6)


@pytest.mark.parametrize("case, expected", [
    ("skew", "camera skew"),
    ("stale_odometry", "odometry stale"),
    ("short_odometry", "the history needs 1.6 s"),
    ("missing_camera", "no frames from camera b"),
    ("dropped_frame", "camera a: no frame within"),
    ("old_input", "input stale"),
    ("repeat", "no new camera frames"),
    ("odometry_gap", "gap"),
])
def test_skip_reasons(case, expected):
    buffers = _buffers()
    now, last_t0 = None, None
    if case == "skew":
        _fill(buffers, lag=3)
    elif case == "stale_odometry":
        _fill(buffers, odom_until=2.0)
    elif case == "short_odometry":
        _fill(buffers, odom_offset=1.5, seconds=1.0)
        for i in range(26):
            buffers.add_image("a", T_START + i * NS // 10, _frame(i))
            buffers.add_image("b", T_START + i * NS // 10, _frame(i))
    elif case == "missing_camera":
        for i in range(5):
            buffers.add_image("a", T_START + i * NS // 10, _frame(i))
    elif case == "dropped_frame":
        last = _fill(buffers)
        frames = buffers._images["a"]  # drop camera a's frame at t0-0.2 s
        kept = [(s, f) for s, f in frames if s != last - 2 * NS // 10]
        frames.clear()
        frames.extend(kept)
    elif case == "old_input":
        last = _fill(buffers)
        now = last + 2 * NS
    elif case == "repeat":
        last_t0 = _fill(buffers)
    elif case == "odometry_gap":
        _fill(buffers, odom_until=0.5)
        for i in range(10):
            t = 1.5 + i * 0.1
            buffers.add_odometry(T_START + int(t * NS), 10 * t * math.cos(0.5), 10 * t * math.sin(0.5), 0.5, 10.0)
    frame, reason = buffers.assemble(now_ns=now, last_t0_ns=last_t0)
    assert frame is None
    assert expected in reason, reason


def test_nan_and_out_of_order_odometry_are_rejected_and_counted():
    buffers = _buffers()
    assert buffers.add_odometry(T_START, 0.0, 0.0, 0.0, 1.0) is None
    assert "non-finite" in buffers.add_odometry(T_START + NS, float("nan"), 0.0, 0.0, 1.0)
    assert "non-finite" in buffers.add_odometry(T_START + NS, 0.0, float("inf"), 0.0, 1.0)
    assert buffers.add_odometry(T_START + NS, 1.0, 0.0, 0.0, 1.0) is None
    assert "older than the newest" in buffers.add_odometry(T_START + NS // 2, 0.5, 0.0, 0.0, 1.0)
    assert "duplicate" in buffers.add_odometry(T_START + NS, 1.0, 0.0, 0.0, 1.0)
    assert buffers.counters[sensing.NAN_ODOMETRY] == 2
    assert buffers.counters[sensing.OUT_OF_ORDER] == 2
    assert buffers.counters[sensing.ODOMETRY] == 2
    assert "non-finite" in buffers.last_reasons[sensing.NAN_ODOMETRY]


def test_out_of_order_image_is_rejected():
    buffers = _buffers()
    assert buffers.add_image("a", T_START + NS, _frame(1)) is None
    assert "camera a" in buffers.add_image("a", T_START + NS // 2, _frame(0))
    assert buffers.counters[sensing.OUT_OF_ORDER] == 1
    assert buffers.add_image("z", T_START, _frame(0)).startswith("unknown camera")


def test_backward_stamp_jump_resets_all_buffers():
    buffers = _buffers()
    last = _fill(buffers)
    assert buffers.assemble()[0] is not None
    generation = buffers.generation
    # A bag loop: odometry restarts 2.5 s earlier; the first messages of the new timeline are
    # outliers until JUMP_CONFIRMATIONS of them agree.
    for i in range(sensing.JUMP_CONFIRMATIONS - 1):
        assert "before the newest" in buffers.add_odometry(T_START + i * NS // 50, 0.0, 0.0, 0.0, 10.0)
        assert buffers.generation == generation
    assert buffers.add_odometry(T_START + NS // 10, 0.0, 0.0, 0.0, 10.0) is None
    assert buffers.counters[sensing.CLOCK_JUMPS] == 1 and buffers.generation > generation
    assert "jumped back" in buffers.last_reasons[sensing.CLOCK_JUMPS]
    stamps = buffers.newest_stamps()
    assert stamps["a"] is None and stamps["b"] is None and stamps["odometry"] == T_START + NS // 10
    frame, reason = buffers.assemble()
    assert frame is None and "no frames" in reason and reason.kind == "no_frames"
    # The same drive fed again assembles normally.
    buffers.reset()
    assert _fill(buffers) == last and buffers.assemble()[0] is not None


def test_one_outlier_stamp_per_second_leaves_the_buffers_alone():
    """A single message far in the past or ahead of the clock is dropped and counted; the drive
    goes on planning, nothing is reset."""
    buffers = _buffers()
    plans = 0
    for second in range(2, 8):
        last = _fill(buffers, seconds=second)
        now = last + NS // 20
        assert "before the newest" in buffers.add_odometry(last - 3 * NS, 0.0, 0.0, 0.0, 10.0, now_ns=now)
        assert "ahead of the clock" in buffers.add_odometry(last + 5 * NS, 0.0, 0.0, 0.0, 10.0, now_ns=now)
        assert "ahead of the clock" in buffers.add_odometry(now + NS // 2, 0.0, 0.0, 0.0, 10.0, now_ns=now)
        assert "ahead of the clock" in buffers.add_image("a", last + 5 * NS, _frame(0), now_ns=now)
        frame, reason = buffers.assemble(now_ns=now)
        plans += frame is not None
        buffers.reset()
    assert plans == 6
    assert buffers.counters[sensing.OUTLIER_STAMPS] == 24 and buffers.counters[sensing.CLOCK_JUMPS] == 0


def test_outliers_that_disagree_do_not_confirm_a_jump():
    buffers = _buffers()
    last = _fill(buffers)
    for back in (5, 9, 3, 7):  # scattered old stamps, not one new timeline
        assert "before the newest" in buffers.add_odometry(last - back * NS, 0.0, 0.0, 0.0, 10.0)
    assert buffers.counters[sensing.CLOCK_JUMPS] == 0 and buffers.assemble()[0] is not None


@pytest.mark.parametrize("speed, x, message", [(1e39, 0.0, "speed"), (1e30, 0.0, "speed"), (-30.0, 0.0, "speed"),
                                               (10.0, 1e30, "position"), (10.0, -2e8, "position")])
def test_implausible_odometry_is_rejected_and_counted(speed, x, message):
    buffers = _buffers()
    reason = buffers.add_odometry(T_START, x, 0.0, 0.0, speed)
    assert reason and message in reason and "dropped" in reason
    assert buffers.counters[sensing.IMPLAUSIBLE_ODOMETRY] == 1 and buffers.counters[sensing.ODOMETRY] == 0
    assert buffers.add_odometry(T_START, 1.0e6, -4.0e6, 0.0, -3.0) is None  # UTM-sized, reversing slowly


def test_clock_jump_resets_all_buffers():
    buffers = _buffers()
    last = _fill(buffers)
    assert not buffers.observe_clock(last)
    assert not buffers.observe_clock(last - NS // 2)  # under the threshold
    assert buffers.observe_clock(last - 5 * NS)
    assert buffers.counters[sensing.CLOCK_JUMPS] == 1
    assert buffers.newest_stamps()["odometry"] is None


def test_ring_buffers_are_bounded():
    buffers = _buffers(buffer_seconds=1.0)
    _fill(buffers, seconds=2.5)
    frames = buffers._images["a"]
    assert (frames[-1][0] - frames[0][0]) <= NS
    assert buffers.assemble()[1].startswith("odometry covers")


# --- Image conversion ----------------------------------------------------------------------------

def _image() -> np.ndarray:
    image = np.zeros((H, W, 3), np.uint8)
    image[:, : W // 2] = (255, 0, 0)  # blue left half (BGR)
    image[:, W // 2 :] = (0, 0, 255)  # red right half
    return image


@pytest.mark.parametrize("fmt, ext", [("jpeg", ".jpg"), ("png", ".png"), ("rgb8; jpeg compressed bgr8", ".jpg"),
                                      ("", ".png")])
def test_decode_compressed(fmt, ext):
    ok, data = cv2.imencode(ext, _image())
    assert ok
    decoded = image_from_compressed(SimpleNamespace(format=fmt, data=data.tobytes()))
    assert decoded.shape == (H, W, 3)
    assert np.abs(decoded.astype(int) - _image()).mean() < 12


def test_decode_compressed_errors():
    with pytest.raises(InputError) as error:
        decode_compressed("jpeg", b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    assert error.value.kind == sensing.DECODE_ERRORS
    with pytest.raises(InputError) as error:
        decode_compressed("jpeg", b"")
    assert error.value.kind == sensing.DECODE_ERRORS
    with pytest.raises(InputError) as error:
        decode_compressed("h264", b"\x00\x00\x00\x01")
    assert error.value.kind == sensing.WRONG_ENCODING and "h264" in error.value.reason


@pytest.mark.parametrize("encoding", ["bgr8", "rgb8", "mono8"])
def test_decode_raw(encoding):
    image = _image()
    if encoding == "rgb8":
        pixels = image[:, :, ::-1]
    elif encoding == "mono8":
        pixels = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    else:
        pixels = image
    channels = pixels.shape[2]
    step = W * channels + 4  # padded rows
    rows = np.zeros((H, step), np.uint8)
    rows[:, : W * channels] = pixels.reshape(H, -1)
    message = SimpleNamespace(encoding=encoding, height=H, width=W, step=step, data=rows.tobytes(), is_bigendian=0)
    decoded = image_from_raw(message)
    assert decoded.shape == (H, W, 3) and decoded.flags.c_contiguous
    if encoding == "mono8":
        np.testing.assert_array_equal(decoded[:, :, 0], pixels[:, :, 0])
    else:
        np.testing.assert_array_equal(decoded, image)


def test_decode_raw_errors():
    with pytest.raises(InputError) as error:
        decode_raw("16UC1", H, W, W * 2, bytes(H * W * 2))
    assert error.value.kind == sensing.WRONG_ENCODING and "16UC1" in error.value.reason
    with pytest.raises(InputError) as error:
        decode_raw("bgr8", H, W, W * 3, bytes(10))
    assert error.value.kind == sensing.DECODE_ERRORS


def test_fit_size():
    image = np.zeros((2 * H, 2 * W, 3), np.uint8)
    resized, changed = fit_size(image, W, H, resize=True)
    assert changed and resized.shape == (H, W, 3)
    same, changed = fit_size(resized, W, H, resize=False)
    assert not changed and same is resized
    with pytest.raises(InputError) as error:
        fit_size(image, W, H, resize=False)
    assert error.value.kind == sensing.WRONG_SIZE


def test_odometry_sample_reads_an_odometry_message():
    yaw = 2.5
    message = SimpleNamespace(
        header=SimpleNamespace(stamp=SimpleNamespace(sec=1_700_000_001, nanosec=250_000_000)),
        pose=SimpleNamespace(pose=SimpleNamespace(
            position=SimpleNamespace(x=1.0, y=2.0, z=0.0),
            orientation=SimpleNamespace(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2)))),
        twist=SimpleNamespace(twist=SimpleNamespace(linear=SimpleNamespace(x=3.0))),
    )
    stamp, x, y, got_yaw, speed = odometry_sample(message)
    assert stamp == 1_700_000_001_250_000_000 and (x, y, speed) == (1.0, 2.0, 3.0)
    assert got_yaw == pytest.approx(yaw)
    # An orientation never filled in (all zeros) has no heading; NaN is not finite.
    for quaternion, kind in (((0.0, 0.0, 0.0, 0.0), sensing.IMPLAUSIBLE_ODOMETRY),
                             ((0.0, 0.0, 0.5, 0.5), sensing.IMPLAUSIBLE_ODOMETRY),
                             ((0.0, 0.0, float("nan"), 1.0), sensing.NAN_ODOMETRY)):
        message.pose.pose.orientation = SimpleNamespace(**dict(zip("xyzw", quaternion)))
        with pytest.raises(InputError, match="not a unit quaternion") as error:
            odometry_sample(message)
        assert error.value.kind == kind


def test_jpeg_size_is_found_after_a_large_exif_segment():
    jpeg = cv2.imencode(".jpg", np.zeros((30, 40, 3), np.uint8))[1].tobytes()
    exif = b"\xff\xe1" + (65535).to_bytes(2, "big") + bytes(65533)  # the largest APP1 segment
    padded = jpeg[:2] + exif + jpeg[2:]
    assert sensing.compressed_image_size(padded) == (40, 30)
    assert decode_compressed("jpeg", padded).shape == (30, 40, 3)
    truncated = padded[:65000]  # cut inside the EXIF segment: no frame header, so no size, not decoded
    assert sensing.compressed_image_size(truncated) is None
    with pytest.raises(InputError, match="no JPEG or PNG header"):
        decode_compressed("jpeg", truncated)


# --- Guards before decoding -------------------------------------------------------------------------

def test_decompression_bomb_is_rejected_from_its_header_cheaply():
    import time
    import tracemalloc

    bomb = jpeg_claiming(32768, 32768)
    assert len(bomb) < 1000 and sensing.compressed_image_size(bomb) == (32768, 32768)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(InputError) as error:
        decode_compressed("jpeg", bomb)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert error.value.kind == sensing.OVERSIZED and "32768x32768" in error.value.reason
    assert elapsed < 0.05 and peak < 50 * 2**20, (elapsed, peak)


def test_crafted_jpegs_cannot_hide_a_large_image_or_stall_the_scan():
    import time

    hidden = cv2.imencode(".jpg", np.zeros((2000, 2000, 3), np.uint8))[1].tobytes()
    small_sof = bytes.fromhex("ffc0 0011 08 0030 0060 03 012200 021100 031100")  # claims 96x48
    # A stray FF 00 "segment" that libjpeg would not skip the way a length-based scan does.
    crafted = b"\xff\xd8\xff\x00" + len(hidden).to_bytes(2, "big")[-2:] + hidden[2:] + small_sof
    assert sensing.compressed_image_size(crafted) is None
    with pytest.raises(InputError):
        decode_compressed("jpeg", crafted, sensing.ImageLimits(max_pixels=1_000_000))
    # Megabytes of fill bytes or empty segments: the scan gives up after a bounded number.
    for filler in (b"\xff" * (4 << 20), b"\xff\xfe\x00\x02" * (1 << 20)):
        start = time.perf_counter()
        assert sensing.compressed_image_size(b"\xff\xd8" + filler) is None
        assert time.perf_counter() - start < 0.05


def test_png_header_and_payload_limits():
    png = cv2.imencode(".png", np.zeros((30, 40, 3), np.uint8))[1].tobytes()
    assert sensing.compressed_image_size(png) == (40, 30)
    limits = sensing.ImageLimits(max_pixels=40 * 30 - 1)
    with pytest.raises(InputError, match="max_image_pixels") as error:
        decode_compressed("png", png, limits)
    assert error.value.kind == sensing.OVERSIZED
    with pytest.raises(InputError, match="max_image_bytes"):
        decode_compressed("png", png, sensing.ImageLimits(max_bytes=len(png) - 1))
    with pytest.raises(InputError, match="no JPEG or PNG header"):
        decode_compressed("", b"GIF89a" + bytes(100))
    with pytest.raises(InputError, match="max_image_pixels"):
        decode_raw("bgr8", 5000, 5000, 15000, b"", limits=sensing.ImageLimits())


def test_tiny_frames_are_rejected_not_stretched():
    one = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes()
    with pytest.raises(InputError, match="too small") as error:
        decode_compressed("png", one, target=(96, 48))
    assert error.value.kind == sensing.WRONG_SIZE
    half = cv2.imencode(".png", np.zeros((24, 48, 3), np.uint8))[1].tobytes()
    assert decode_compressed("png", half, target=(96, 48)).shape == (24, 48, 3)  # resized later


def test_large_jpeg_is_decoded_at_a_reduced_scale_that_still_covers_the_model():
    big = np.zeros((960, 1920, 3), np.uint8)
    big[:, 960:] = 255
    jpeg = cv2.imencode(".jpg", big)[1].tobytes()
    image = decode_compressed("jpeg", jpeg, target=(96, 48))
    assert image.shape == (120, 240, 3)  # 1/8 scale
    assert decode_compressed("jpeg", jpeg, target=(500, 300)).shape == (480, 960, 3)  # 1/2 scale
    fitted, resized = fit_size(image, 96, 48, True)
    assert resized and fitted[:, :40].mean() < 10 and fitted[:, 56:].mean() > 245


def test_header_stamp_is_read_from_serialized_messages():
    pytest.importorskip("rclpy", reason="the ROS 2 wheels (rclpy) are not installed")
    from nav_msgs.msg import Odometry
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import CompressedImage

    for message in (Odometry(), CompressedImage(data=b"abc", format="jpeg")):
        message.header.stamp.sec, message.header.stamp.nanosec = 1_700_000_123, 456_789
        assert sensing.peek_header_stamp_ns(serialize_message(message)) == 1_700_000_123 * NS + 456_789
    assert sensing.peek_header_stamp_ns(b"\x01\x02") is None


def test_decimator_keeps_one_message_per_period_and_passes_old_stamps():
    decimator = sensing.Decimator(20 * NS // 1000)
    kept = [t for t in range(0, 1000) if decimator.keep(T_START + t * NS // 1000)]  # 1 kHz for 1 s
    assert len(kept) == 50 and all(b - a == 20 for a, b in zip(kept, kept[1:]))
    assert decimator.keep(T_START)  # back in time: passes (the buffers count it)
    assert decimator.keep(T_START) and decimator.keep(T_START)  # duplicates too
    assert sensing.Decimator(0).keep(T_START) and sensing.Decimator(0).keep(T_START)


def test_decimator_keeps_a_stream_just_above_its_limit_close_to_the_limit():
    """A 50 Hz camera under a 40 Hz limit (22.5 ms with the node's 10 % margin) keeps about 44 Hz,
    spread so that every 10 Hz instant has a frame within half the 40 ms tolerance."""
    decimator = sensing.Decimator(225 * NS // 10000)
    stamps = [T_START + i * 20 * NS // 1000 for i in range(500)]  # 10 s at 50 Hz
    kept = np.array([s for s in stamps if decimator.keep(s)])
    assert 420 <= len(kept) <= 460
    instants = T_START + np.arange(5, 95) * NS // 10
    nearest = np.abs(kept[None, :] - instants[:, None]).min(axis=1)
    assert nearest.max() <= 20 * NS // 1000


def test_odometry_position_jumps_are_dropped_and_a_restarted_source_is_followed():
    buffers = _buffers()
    last = _fill(buffers)  # 10 m/s along yaw 0.5
    assert buffers.assemble(now_ns=last + NS // 20)[0] is not None
    # One sample 1 km away (a plausible twist): dropped, the history is untouched.
    reason = buffers.add_odometry(last + NS // 50, 1000.0, 0.0, 0.5, 10.0)
    assert "position jumped" in reason and buffers.counters[sensing.IMPLAUSIBLE_ODOMETRY] == 1
    frame, _ = buffers.assemble(now_ns=last + NS // 20)
    assert frame is not None and np.abs(frame.history_xyz).max() < 20.0
    # The source restarts at the origin: after JUMP_CONFIRMATIONS agreeing samples it is followed.
    for i in range(1, sensing.JUMP_CONFIRMATIONS + 1):
        result = buffers.add_odometry(last + (1 + i) * NS // 50, 0.2 * i, 0.0, 0.0, 10.0)
    assert result is None and "history restarted" in buffers.last_reasons[sensing.IMPLAUSIBLE_ODOMETRY]
    assert buffers.counters[sensing.ODOMETRY] > 0 and buffers._odometry[0][1] == pytest.approx(0.2)


def test_sensor_inputs_from_serialized_messages():
    """The node's path: serialized bytes -> decimation by header stamp -> size cap before
    deserialisation -> decoding -> buffers; the odometry frame is learnt from accepted samples."""
    pytest.importorskip("rclpy", reason="the ROS 2 wheels (rclpy) are not installed")
    from nav_msgs.msg import Odometry
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import CompressedImage

    types = {"CompressedImage": CompressedImage, "Odometry": Odometry}
    buffers = _buffers()
    inputs = sensing.SensorInputs(buffers, True, lambda data, kind: deserialize_message(data, types[kind]))
    inputs.configure(sensing.ImageLimits(max_bytes=4096), camera_max_rate_hz=20.0, odom_max_rate_hz=100.0)

    def image(stamp, data):
        message = CompressedImage(format="jpeg", data=data)
        message.header.stamp.sec, message.header.stamp.nanosec = stamp // NS, stamp % NS
        return serialize_message(message)

    def odometry(stamp, parent="odom", child="base_link", w=1.0):
        message = Odometry()
        message.header.stamp.sec, message.header.stamp.nanosec = stamp // NS, stamp % NS
        message.header.frame_id, message.child_frame_id = parent, child
        message.pose.pose.orientation.w = w
        return serialize_message(message)

    jpeg = cv2.imencode(".jpg", _frame(7))[1].tobytes()
    assert inputs.image("a", image(T_START, jpeg), None) is None
    assert inputs.image("a", image(T_START + NS // 100, jpeg), None) is None  # 100 Hz: decimated
    assert buffers.counters[sensing.DECIMATED] == 1 and buffers.counters[sensing.IMAGES] == 1
    key, reason = inputs.image("a", image(T_START + NS, bytes(8192)), None)
    assert key.startswith(sensing.OVERSIZED) and "not deserialised" in reason
    assert inputs.image("z", image(T_START, jpeg), None)[1] == "unknown camera 'z'"
    # The first odometry is unusable (no orientation): it does not fix the frame.
    assert inputs.odometry(odometry(T_START, parent="map", w=0.0), None)[0] == sensing.IMPLAUSIBLE_ODOMETRY
    assert inputs.odometry(odometry(T_START + NS // 50), None) is None
    key, reason = inputs.odometry(odometry(T_START + 2 * NS // 50, child="imu_link"), None)
    assert key == sensing.FRAME_MISMATCH and "'odom' -> 'base_link'" in reason
    assert buffers.counters[sensing.ODOMETRY] == 2


def _standing_or_creeping_odometry(buffers, speed: float, position_sigma: float, speed_sigma: float,
                                   yaw_sigma: float, seconds=2.5, hz=50.0, seed=0):
    """Odometry of a car at `speed` (0: standing) as a GNSS/INS reports it: white position, twist
    and yaw noise, a slow position drift and a twist biased slightly negative."""
    rng = np.random.default_rng(seed)
    drift = np.cumsum(rng.normal(0.0, 0.002, (int(seconds * hz) + 1, 2)), axis=0)  # about 1-2 cm over the history
    for i, (dx, dy) in enumerate(drift):
        t = i / hz
        x, y, yaw = _pose(t, speed=speed)
        x, y = x + dx + rng.normal(0.0, position_sigma), y + dy + rng.normal(0.0, position_sigma)
        twist = speed - 0.01 + rng.normal(0.0, speed_sigma)
        assert buffers.add_odometry(T_START + int(round(t * NS)), x, y, yaw + rng.normal(0.0, yaw_sigma), twist) is None


# Per-sample noise (1 sigma): a fused GNSS/INS pose (the comma2k19 poses move about 1 mm per 0.1 s
# off their own velocity) and the replay bags' odometry (data.bag), the noisier of the two.
FUSED = (0.001, 0.01, math.radians(0.05))
BAG = (0.02, 0.05, math.radians(0.2))


@pytest.mark.parametrize("noise", [FUSED, BAG], ids=["fused", "bag"])
def test_standing_car_gives_the_worlds_history_of_a_standing_ego(noise):
    from chain_spec_ros.scenarios.scene import make_scene

    world = next(scene for scene in (make_scene(seed, event="red_light", render=False) for seed in range(100))
                 if scene.speed == 0.0)
    buffers = _buffers()
    last = _fill(buffers, odom_until=-1.0)  # cameras only
    _standing_or_creeping_odometry(buffers, 0.0, *noise)
    frame, reason = buffers.assemble(now_ns=last)
    assert reason == ""
    np.testing.assert_array_equal(frame.history_tokens, world.history_tokens)
    assert frame.speed == 0.0 and world.speed == 0.0


@pytest.mark.parametrize("noise", [FUSED, BAG], ids=["fused", "bag"])
def test_creeping_car_keeps_its_measured_motion(noise):
    buffers = _buffers()
    last = _fill(buffers, odom_until=-1.0)
    _standing_or_creeping_odometry(buffers, 0.5, *noise)
    frame, reason = buffers.assemble(now_ns=last)
    assert reason == ""
    assert frame.history_xyz[0, 0] == pytest.approx(-0.8, abs=0.1)  # 1.6 s at 0.5 m/s
    assert frame.speed == pytest.approx(0.5, abs=0.2)


def test_hold_at_rest_needs_both_a_slow_twist_and_a_short_step():
    moving = np.column_stack([np.linspace(-16.0, 0.0, 17), np.zeros(17)])  # 10 m/s
    held, still = sensing.hold_at_rest(moving, np.zeros(17))  # a source that never fills the twist
    np.testing.assert_array_equal(held, moving)
    assert not still.any()
    jitter = np.random.default_rng(1).normal(0.0, 0.02, (17, 2))
    speeds = np.r_[np.zeros(12), np.full(5, 1.0)]  # standing, then starting
    held, still = sensing.hold_at_rest(jitter - jitter[-1], speeds)
    assert still.tolist() == [True] * 11 + [False] * 5
    np.testing.assert_array_equal(held[:12], np.repeat(held[11:12], 12, axis=0))  # still steps add nothing
    np.testing.assert_allclose(np.diff(held[11:], axis=0), np.diff(jitter[11:], axis=0))
    assert np.allclose(held[-1], 0.0)
