"""Sensor messages -> numpy, time alignment and history resampling. No ROS imports.

The node hands every decoded camera frame and odometry sample to `SensorBuffers`, which
keeps a short ring buffer per topic and, on each planning tick, assembles a `SensorFrame`:

- t0 is the oldest of the cameras' newest stamps, so every camera has a frame at t0;
- per camera, the `NUM_FRAMES` frames nearest t0-0.3, -0.2, -0.1, 0 s (10 Hz), each within a
  tolerance;
- the ego history: odometry interpolated at the 17 instants t0-1.6 s .. t0 (linear in position,
  shortest arc in yaw), expressed in the t0 vehicle frame, steps taken at rest held still
  (`hold_at_rest`), and quantised by `history_bins`.

Nothing here raises on bad input: insertion and assembly return a reason string (and count
it), so the node can report it on /diagnostics and carry on. Message conversion takes the
message objects duck-typed (`format`/`data`, `encoding`/`height`/`width`/`step`/`data`), so it
works on rclpy messages, rosbags messages and test doubles alike, and raises `InputError`
(with the counter it belongs to) for the caller to record.

Guards, so that no message can cost the node more than a bounded amount of time and memory or
put something implausible into the planner:
- a compressed image's size is read from its header before decoding (a 600-byte JPEG can claim
  32768x32768 pixels); oversized payloads and frames are rejected and counted, and large JPEGs
  are decoded at a reduced scale (libjpeg's DCT scaling) when that still covers the model size;
- raw serialized messages are decimated by their header stamp before deserialisation
  (`peek_header_stamp_ns`, `Decimator`), so a 1 kHz odometry stream costs little;
- odometry must be finite and plausible (speed, position);
- one stamp far from its topic's timeline (an outlier) is dropped and counted; only a clock
  jump that the node's clock confirms, or several consecutive messages on the new timeline,
  resets the buffers (a bag loop).
"""
from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

# A backstop under the header checks below: OpenCV itself refuses to decode more pixels than this
# (its own default is 2^30, about 3 GiB of BGR). Read by OpenCV at its first decode.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(8192 * 8192))
import cv2  # noqa: E402

from .constants import IMAGE_HEIGHT, IMAGE_WIDTH, NS
from .scenarios.scene import NUM_FRAMES
from .trajectory import HISTORY_SECONDS, HISTORY_STEPS, REST_SPEED, STEP_SECONDS, history_bins, to_local_frame

# Counter names (also the keys the node publishes on /diagnostics).
IMAGES, ODOMETRY = "images", "odometry"  # accepted messages
NAN_ODOMETRY = "nan_odometry"
IMPLAUSIBLE_ODOMETRY = "implausible_odometry"
OUT_OF_ORDER = "out_of_order"
OUTLIER_STAMPS = "outlier_stamps"
CLOCK_JUMPS = "clock_jumps"
DECODE_ERRORS = "decode_errors"
WRONG_ENCODING = "wrong_encoding"
WRONG_SIZE = "wrong_size"
OVERSIZED = "oversized_images"
FRAME_MISMATCH = "frame_id_mismatch"
RESIZED = "resized"
DECIMATED = "decimated"  # messages above the configured input rate, dropped before deserialisation
REJECTION_COUNTERS = (NAN_ODOMETRY, IMPLAUSIBLE_ODOMETRY, OUT_OF_ORDER, OUTLIER_STAMPS, CLOCK_JUMPS, DECODE_ERRORS,
                      WRONG_ENCODING, WRONG_SIZE, OVERSIZED, FRAME_MISMATCH)
# Consecutive messages on a new timeline that confirm a jump of a topic's stamps (a bag loop).
JUMP_CONFIRMATIONS = 3
# An orientation quaternion further than this from unit norm is not a rotation (drivers that
# leave it unset send zeros); float32 round-off stays far below it.
QUATERNION_NORM_TOLERANCE = 0.01

RAW_ENCODINGS = {"bgr8": 3, "rgb8": 3, "mono8": 1}
COMPRESSED_FORMATS = ("jpeg", "jpg", "png")


class SkipReason(str):
    """Why a tick could not plan: the text, and a `kind` without numbers (for counting and
    rate-limiting the log by kind)."""

    def __new__(cls, kind: str, text: str):
        reason = super().__new__(cls, text)
        reason.kind = kind
        return reason


class InputError(ValueError):
    """A message the node cannot use. `kind` is the counter it is recorded under."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# --- Message conversion ---------------------------------------------------------------------------

def _bytes(data) -> np.ndarray:
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):  # a list of ints (some message libraries)
        return np.asarray(data, dtype=np.uint8).ravel()


@dataclass(frozen=True)
class ImageLimits:
    """What an incoming camera frame may cost before it is decoded, and how small it may be."""

    max_bytes: int = 16 * 1024 * 1024  # payload of one message
    max_pixels: int = 4096 * 4096  # width x height, read from the header before decoding
    min_scale: float = 0.25  # a frame narrower or lower than this share of the model's input is rejected


# Segments allowed before a JPEG's frame header: tables (DHT, DAC, DQT, DRI), APPn, COM. Anything
# else there (a stray FF 00, an unknown marker) is not skipped the way libjpeg would read it, so
# the header we find might not be the one it decodes: no size, no decoding.
_JPEG_TABLE_SEGMENTS = frozenset((0xC4, 0xCC, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE))
_JPEG_MAX_SEGMENTS = 64  # real files have a handful before SOF; bounds the scan's time
_JPEG_MAX_FILL = 1024


def _jpeg_size(buffer) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame marker, or None if there is none among the
    first _JPEG_MAX_SEGMENTS well-formed segments."""
    i, fill = 2, 0
    for _ in range(_JPEG_MAX_SEGMENTS + _JPEG_MAX_FILL):
        if i + 9 > len(buffer) or buffer[i] != 0xFF:
            return None
        marker = buffer[i + 1]
        if marker == 0xFF:  # fill byte
            fill += 1
            if fill > _JPEG_MAX_FILL:
                return None
            i += 1
            continue
        length = int.from_bytes(buffer[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            return int.from_bytes(buffer[i + 7:i + 9], "big"), int.from_bytes(buffer[i + 5:i + 7], "big")
        if marker not in _JPEG_TABLE_SEGMENTS or length < 2:
            return None
        i += 2 + length
    return None


def compressed_image_size(data) -> tuple[int, int] | None:
    """(width, height) claimed by a JPEG or PNG header (bytes or a memoryview), without decoding;
    None if unknown."""
    if bytes(data[:8]) == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and bytes(data[12:16]) == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if bytes(data[:2]) == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _check_dimensions(width: int, height: int, limits: ImageLimits, target: tuple[int, int] | None) -> None:
    if width * height > limits.max_pixels:
        raise InputError(OVERSIZED, f"image of {width}x{height} pixels exceeds max_image_pixels "
                                    f"({limits.max_pixels}); not decoded")
    if target is not None and (width < target[0] * limits.min_scale or height < target[1] * limits.min_scale):
        raise InputError(WRONG_SIZE, f"image of {width}x{height} is too small for the model's {target[0]}x{target[1]} "
                                     f"(less than {limits.min_scale:g} of it)")


def _reduced_read_flag(size: tuple[int, int], target: tuple[int, int] | None) -> int:
    """The largest JPEG DCT reduction (1/2, 1/4, 1/8) that still covers the model's input size."""
    if target is None:
        return cv2.IMREAD_COLOR
    for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                         (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if size[0] // factor >= target[0] and size[1] // factor >= target[1]:
            return flag
    return cv2.IMREAD_COLOR


def decode_compressed(fmt: str, data, limits: ImageLimits = ImageLimits(),
                      target: tuple[int, int] | None = None) -> np.ndarray:
    """A sensor_msgs/CompressedImage payload (JPEG or PNG) -> BGR uint8 [H, W, 3].

    `format` is free text in ROS ("jpeg", "png", "bgr8; jpeg compressed bgr8", ...); an empty
    format is accepted and sniffed by the decoder. Anything naming another codec is rejected.
    The header's claimed size is checked against `limits` before any pixel is decoded; with a
    `target` (width, height) a large JPEG is decoded at the coarsest DCT scale that covers it.
    """
    text = (fmt or "").lower()
    if text and not any(name in text for name in COMPRESSED_FORMATS):
        raise InputError(WRONG_ENCODING, f"unsupported CompressedImage format {fmt!r} (expected jpeg or png)")
    buffer = _bytes(data)
    if buffer.size == 0:
        raise InputError(DECODE_ERRORS, "empty CompressedImage")
    if buffer.size > limits.max_bytes:
        raise InputError(OVERSIZED, f"CompressedImage of {buffer.size} bytes exceeds max_image_bytes "
                                    f"({limits.max_bytes}); not decoded")
    head = memoryview(buffer)  # no copy: a JPEG's frame header may follow 64 KiB of EXIF
    size = compressed_image_size(head)
    if size is None:
        raise InputError(DECODE_ERRORS, f"a {buffer.size}-byte {fmt or 'compressed'} payload has no JPEG or PNG "
                                        f"header with the image size")
    _check_dimensions(*size, limits, target)
    flag = _reduced_read_flag(size, target) if bytes(head[:2]) == b"\xff\xd8" else cv2.IMREAD_COLOR
    image = cv2.imdecode(buffer, flag)
    if image is None:
        raise InputError(DECODE_ERRORS, f"could not decode a {len(buffer)}-byte {fmt or 'compressed'} image")
    return image


def decode_raw(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0,
               limits: ImageLimits = ImageLimits(), target: tuple[int, int] | None = None) -> np.ndarray:
    """A sensor_msgs/Image (bgr8, rgb8 or mono8) -> BGR uint8 [H, W, 3]."""
    channels = RAW_ENCODINGS.get((encoding or "").lower())
    if channels is None:
        raise InputError(WRONG_ENCODING, f"unsupported Image encoding {encoding!r} (expected one of "
                                         f"{', '.join(RAW_ENCODINGS)})")
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise InputError(DECODE_ERRORS, f"empty Image ({width}x{height})")
    _check_dimensions(width, height, limits, target)
    row = width * channels
    step = step or row
    buffer = _bytes(data)
    if step < row or buffer.size < step * height:
        raise InputError(DECODE_ERRORS, f"Image data too short: {buffer.size} bytes for {width}x{height} "
                                        f"{encoding} with step {step}")
    pixels = buffer[: step * height].reshape(height, step)[:, :row].reshape(height, width, channels)
    if channels == 1:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if encoding.lower() == "rgb8":
        return np.ascontiguousarray(pixels[:, :, ::-1])
    return pixels.copy()


def image_from_compressed(message, limits: ImageLimits = ImageLimits(),
                          target: tuple[int, int] | None = None) -> np.ndarray:
    return decode_compressed(message.format, message.data, limits, target)


def image_from_raw(message, limits: ImageLimits = ImageLimits(), target: tuple[int, int] | None = None) -> np.ndarray:
    return decode_raw(message.encoding, message.height, message.width, message.step, message.data,
                      getattr(message, "is_bigendian", 0), limits, target)


def fit_size(image: np.ndarray, width: int, height: int, resize: bool) -> tuple[np.ndarray, bool]:
    """The image at the model's input size: unchanged, resized (returns True) or rejected."""
    if image.shape[:2] == (height, width):
        return image, False
    if not resize:
        raise InputError(WRONG_SIZE, f"image is {image.shape[1]}x{image.shape[0]}, the model expects "
                                     f"{width}x{height} (resize_images is off)")
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), True


def peek_header_stamp_ns(serialized: bytes) -> int | None:
    """The header stamp of a serialized (CDR) message whose first field is a std_msgs/Header,
    read without deserialising it; None for an encapsulation this does not know."""
    if len(serialized) < 12 or serialized[0] != 0 or serialized[1] not in (0, 1, 6, 7):
        return None
    order = "little" if serialized[1] & 1 else "big"
    sec = int.from_bytes(serialized[4:8], order, signed=True)
    nanosec = int.from_bytes(serialized[8:12], order)
    return sec * NS + nanosec


class Decimator:
    """Keeps at most one message per `min_period_ns` of header time on average (0: keep all).

    The slot of the last kept message advances by one period, not to the kept stamp, so a stream
    just above the limit keeps close to the limit's rate (a 25 Hz camera under a 20 Hz limit keeps
    about 22 Hz, not every other frame at 12.5 Hz). A stamp older than the last kept one, or equal
    to it, passes, so that the buffers see (and count) out-of-order and duplicate input.
    """

    def __init__(self, min_period_ns: int = 0):
        self.min_period_ns = min_period_ns
        self._slot: int | None = None

    def keep(self, stamp_ns: int | None) -> bool:
        period, slot = self.min_period_ns, self._slot
        if stamp_ns is None or period <= 0 or slot is None or stamp_ns <= slot:
            if stamp_ns is not None and stamp_ns != slot:  # a duplicate keeps the slot
                self._slot = stamp_ns
            return True
        if stamp_ns - slot < period:
            return False
        self._slot = stamp_ns if stamp_ns - slot >= 2 * period else slot + period
        return True


def yaw_from_quaternion(x: float, y: float, z: float, w: float) -> float:
    """Heading (rotation about z) of an orientation quaternion."""
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def odometry_sample(message) -> tuple[int, float, float, float, float]:
    """A nav_msgs/Odometry -> (stamp ns, x, y, yaw, forward speed). An orientation that is not a
    unit quaternion (e.g. all zeros: never filled in) has no heading: InputError."""
    stamp = message.header.stamp
    pose = message.pose.pose
    q = pose.orientation
    norm = math.sqrt(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w)
    if not abs(norm - 1.0) <= QUATERNION_NORM_TOLERANCE:  # also catches NaN
        kind = NAN_ODOMETRY if not math.isfinite(norm) else IMPLAUSIBLE_ODOMETRY
        raise InputError(kind, f"odometry orientation ({q.x:.3g}, {q.y:.3g}, {q.z:.3g}, {q.w:.3g}) is not a unit "
                               f"quaternion (norm {norm:.3g}); dropped")
    return (stamp_ns(stamp), float(pose.position.x), float(pose.position.y),
            yaw_from_quaternion(q.x, q.y, q.z, q.w), float(message.twist.twist.linear.x))


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * NS + int(stamp.nanosec)


# --- Alignment ------------------------------------------------------------------------------------

@dataclass
class SensingConfig:
    cameras: tuple[str, ...]
    image_width: int = IMAGE_WIDTH
    image_height: int = IMAGE_HEIGHT
    num_frames: int = NUM_FRAMES
    frame_period_s: float = STEP_SECONDS
    frame_tolerance_s: float = 0.04  # a chosen frame may be this far from its target instant
    max_camera_skew_s: float = 0.15  # spread of the cameras' newest stamps
    max_odom_staleness_s: float = 0.2  # newest odometry may be this much older than t0
    max_odom_gap_s: float = 0.5  # largest gap between odometry samples inside the history window
    max_input_age_s: float = 1.0  # skip when t0 is older than this (a dead camera stream)
    clock_jump_threshold_s: float = 1.0  # stamps further than this behind a topic's timeline are outliers
    max_future_stamp_s: float = 0.25  # stamps further than this ahead of the node's clock are outliers
    buffer_seconds: float = 3.0
    resize_images: bool = True
    max_speed_mps: float = 90.0  # odometry forward speed above this is implausible
    max_reverse_speed_mps: float = 15.0  # and reversing faster than this
    max_abs_position_m: float = 1e8  # odometry position components beyond this are implausible


@dataclass
class SensorFrame:
    """Everything the planner needs for one tick, plus how good the inputs were."""

    t0_ns: int
    images: np.ndarray  # uint8 [cameras, frames, H, W, 3] BGR, oldest frame first
    frame_stamps_ns: np.ndarray  # int64 [cameras, frames]
    history_xyz: np.ndarray  # [17, 3] t0-1.6 s .. t0 in the t0 frame
    history_tokens: np.ndarray  # [48]
    speed: float  # m/s at t0
    pose: tuple[float, float, float]  # (x, y, yaw) at t0 in the odometry frame
    camera_skew_s: float  # spread of the cameras' newest stamps
    frame_misalignment_s: float  # largest |chosen frame stamp - its target instant|
    odom_lag_s: float  # t0 - newest odometry stamp (negative: odometry is ahead)
    input_age_s: float  # clock now - t0 at assembly (nan without a clock)
    assembly_ms: float = 0.0

    @property
    def t0(self) -> float:
        return self.t0_ns / NS


def _interp_extrapolate(times: np.ndarray, stamps: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Linear interpolation; beyond the newest sample, linear extrapolation from the last two."""
    out = np.interp(times, stamps, values)
    late = times > stamps[-1]
    if late.any():
        slope = (values[-1] - values[-2]) / (stamps[-1] - stamps[-2])
        out[late] = values[-1] + slope * (times[late] - stamps[-1])
    return out


def interpolate_odometry(samples: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Odometry rows (t, x, y, yaw, speed), t strictly increasing -> [len(times), 4] (x, y, yaw, speed).

    Position and speed are linear in time; yaw is unwrapped first so that each step between
    samples takes the shortest arc (a heading crossing +-pi does not spin the long way round).
    """
    t = samples[:, 0]
    yaw = np.unwrap(samples[:, 3])
    columns = [_interp_extrapolate(times, t, samples[:, 1]), _interp_extrapolate(times, t, samples[:, 2]),
               _interp_extrapolate(times, t, yaw), np.interp(times, t, samples[:, 4])]
    return np.stack(columns, axis=1)


# A history step no longer than this can be position jitter of a car standing still (a GNSS/INS
# jitters by centimetres); any driving step is longer, even creeping at REST_SPEED moves 2 cm.
STILL_STEP_M = 0.1


def hold_at_rest(local_xy: np.ndarray, speeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """History positions [17, 2] (t0 frame) with the steps taken at rest set to zero, and which
    steps [16] were held.

    A step is at rest when the odometry twist is under REST_SPEED at both its ends, of either
    sign (some sources report -0.01 m/s standing still), and the step is shorter than
    STILL_STEP_M. Why: the world's ego at rest stands exactly still, so its steps are exactly
    zero and all its history tokens are the zero bin. A real car at rest jitters: a fused
    GNSS/INS pose by millimetres (the comma2k19 segment's poses move about 1 mm per 0.1 s off
    their own velocity), a raw one or the replay bags' odometry (2 cm, 0.05 m/s, 0.2 degrees
    per sample) by centimetres. One bin is 8 mm, so unheld the history of a car at a red light
    would be tokens scattered up to 9 bins around zero (measured in test_sensing), steps that in
    the world only a rolling car makes. Jitter added to the world instead would tie training to one
    sensor's noise (wheel odometry has none); held, a standing car gives the world's tokens
    exactly, from any source. Steps whose twist says moving keep their measured motion, so
    creeping and starting are untouched, and the step-length bound keeps a source that never
    fills the twist from freezing a moving history.
    """
    steps = np.diff(local_xy, axis=0)
    slow = np.abs(speeds) < REST_SPEED
    still = slow[:-1] & slow[1:] & (np.linalg.norm(steps, axis=1) < STILL_STEP_M)
    steps[still] = 0.0
    positions = np.vstack([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return positions - positions[-1], still  # t0 stays the origin


class SensorBuffers:
    """Per-topic ring buffers and SensorFrame assembly. Thread-safe: callbacks insert while the
    timer assembles."""

    def __init__(self, config: SensingConfig):
        if not config.cameras:
            raise ValueError("at least one camera is needed")
        self.config = config
        self.counters: Counter[str] = Counter()
        self.last_reasons: dict[str, str] = {}
        self._lock = threading.Lock()
        self._images: dict[str, deque] = {name: deque() for name in config.cameras}
        self._odometry: deque = deque()
        self._last_clock_ns: int | None = None
        self._pending_jumps: dict[str, list[int]] = {}  # per topic: stamps of a possible new timeline
        self._track: list[tuple] = []  # odometry samples of a possible new position track
        self.generation = 0  # bumped by every reset: stamps from before it are another timeline

    # -- bookkeeping

    def record(self, kind: str, reason: str) -> str:
        """Count a rejected input (or any event) and remember its reason. Returns the reason."""
        with self._lock:
            return self._count(kind, reason)

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self.generation += 1
        self._pending_jumps.clear()
        self._track.clear()
        for buffer in self._images.values():
            buffer.clear()
        self._odometry.clear()

    def _jump(self, reason: str) -> None:
        """A backward jump in time (a bag loop): everything buffered is from another timeline."""
        self._clear()
        self._count(CLOCK_JUMPS, reason)
        self._last_clock_ns = None

    def observe_clock(self, now_ns: int) -> bool:
        """Feed the node's clock; a backward jump above the threshold resets all buffers."""
        with self._lock:
            last, self._last_clock_ns = self._last_clock_ns, now_ns
            if last is not None and last - now_ns > self.config.clock_jump_threshold_s * NS:
                self._jump(f"clock jumped back {(last - now_ns) / NS:.2f} s; buffers reset")
                self._last_clock_ns = now_ns
                return True
        return False

    def _accept_stamp(self, topic: str, buffer: deque, stamp: int, now_ns: int | None) -> str | None:
        """Order and timeline checks for a new stamp (lock held). None if it may be appended.

        A stamp ahead of the node's clock by more than max_future_stamp_s, or behind its topic's
        newest by more than the jump threshold, is an outlier and dropped, unless JUMP_CONFIRMATIONS consecutive
        messages agree on the new (earlier) timeline: then it was a real jump and every buffer
        resets. A small step back is out of order and dropped.
        """
        threshold = int(self.config.clock_jump_threshold_s * NS)
        if now_ns and stamp - now_ns > self.config.max_future_stamp_s * NS:
            return self._count(OUTLIER_STAMPS, f"{topic}: stamp {(stamp - now_ns) / NS:.2f} s ahead of the clock; dropped")
        if not buffer or stamp > buffer[-1][0]:
            self._pending_jumps.pop(topic, None)
            return None
        back = (buffer[-1][0] - stamp) / NS
        if back * NS > threshold:
            pending = self._pending_jumps.setdefault(topic, [])
            if pending and not 0 < stamp - pending[-1] <= threshold:
                pending.clear()  # not the same new timeline: start counting again
            pending.append(stamp)
            if len(pending) >= JUMP_CONFIRMATIONS:
                self._jump(f"{topic} stamps jumped back {back:.2f} s ({len(pending)} messages agree); buffers reset")
                return None
            return self._count(OUTLIER_STAMPS, f"{topic}: stamp {back:.2f} s before the newest one; dropped")
        reason = (f"{topic}: duplicate stamp" if back == 0 else
                  f"{topic}: stamp {back * 1e3:.0f} ms older than the newest one; dropped")
        return self._count(OUT_OF_ORDER, reason)

    def _position_jump(self, sample: tuple[int, float, float, float, float]) -> str | None:
        """A sample further from the previous one than max_speed_mps allows (lock held): dropped,
        unless JUMP_CONFIRMATIONS consecutive samples agree on the new track (the odometry source
        restarted): then the odometry history starts again from them."""
        if not self._odometry:
            return None
        stamp, x, y = sample[:3]
        last_stamp, last_x, last_y = self._odometry[-1][:3]
        dt = (stamp - last_stamp) / NS
        distance = math.hypot(x - last_x, y - last_y)
        if distance <= self.config.max_speed_mps * dt * 1.5 + 1.0:
            self._track.clear()
            return None
        track = self._track
        if track and math.hypot(x - track[-1][1], y - track[-1][2]) > self.config.max_speed_mps * (
                stamp - track[-1][0]) / NS * 1.5 + 1.0:
            track.clear()  # not one new track either
        track.append(sample)
        if len(track) >= JUMP_CONFIRMATIONS:
            self._odometry.clear()
            self._count(IMPLAUSIBLE_ODOMETRY, f"odometry position jumped {distance:.3g} m and stayed there for "
                                              f"{len(track)} samples: odometry history restarted")
            self._odometry.extend(track[:-1])
            track.clear()
            return None
        return self._count(IMPLAUSIBLE_ODOMETRY, f"odometry position jumped {distance:.3g} m in {dt:.3f} s "
                                                 f"(faster than {self.config.max_speed_mps:g} m/s); dropped")

    def _count(self, kind: str, reason: str) -> str:
        """`record` with the lock already held."""
        self.counters[kind] += 1
        self.last_reasons[kind] = reason
        return reason

    def _prune(self, buffer: deque, newest: int) -> None:
        horizon = newest - int(self.config.buffer_seconds * NS)
        while buffer and buffer[0][0] < horizon:
            buffer.popleft()

    # -- insertion

    def add_image(self, camera: str, stamp: int, image: np.ndarray, now_ns: int | None = None) -> str | None:
        """Insert a decoded BGR frame at the model's size. Returns a reason if it was rejected.
        `now_ns` is the node's clock (None or 0 when it has none yet)."""
        with self._lock:
            buffer = self._images.get(camera)
            if buffer is None:
                return f"unknown camera {camera!r}"
            reason = self._accept_stamp(f"camera {camera}", buffer, stamp, now_ns)
            if reason:
                return reason
            buffer = self._images[camera]
            buffer.append((stamp, image))
            self._prune(buffer, stamp)
            self.counters[IMAGES] += 1
        return None

    def add_odometry(self, stamp: int, x: float, y: float, yaw: float, speed: float,
                     now_ns: int | None = None) -> str | None:
        """Insert one odometry sample. Returns a reason if it was rejected."""
        if not all(math.isfinite(v) for v in (x, y, yaw, speed)):
            return self.record(NAN_ODOMETRY, f"odometry with a non-finite value "
                                             f"(x={x}, y={y}, yaw={yaw}, speed={speed}); dropped")
        cfg = self.config
        if not -cfg.max_reverse_speed_mps <= speed <= cfg.max_speed_mps:
            return self.record(IMPLAUSIBLE_ODOMETRY, f"odometry speed {speed:.4g} m/s outside "
                                                     f"[-{cfg.max_reverse_speed_mps:g}, {cfg.max_speed_mps:g}]; dropped")
        if max(abs(x), abs(y)) > cfg.max_abs_position_m:
            return self.record(IMPLAUSIBLE_ODOMETRY, f"odometry position ({x:.4g}, {y:.4g}) beyond "
                                                     f"{cfg.max_abs_position_m:g} m; dropped")
        with self._lock:
            reason = self._accept_stamp("odometry", self._odometry, stamp, now_ns)
            if reason:
                return reason
            reason = self._position_jump((stamp, float(x), float(y), float(yaw), float(speed)))
            if reason:
                return reason
            self._odometry.append((stamp, float(x), float(y), float(yaw), float(speed)))
            self._prune(self._odometry, stamp)
            self.counters[ODOMETRY] += 1
        return None

    # -- assembly

    def newest_stamps(self) -> dict[str, int | None]:
        with self._lock:
            stamps = {name: (b[-1][0] if b else None) for name, b in self._images.items()}
            stamps["odometry"] = self._odometry[-1][0] if self._odometry else None
        return stamps

    def assemble(self, now_ns: int | None = None, last_t0_ns: int | None = None
                 ) -> tuple[SensorFrame | None, SkipReason | str]:
        """The SensorFrame for this tick, or (None, why not)."""
        start = time.perf_counter()
        cfg = self.config
        with self._lock:  # snapshot; frames themselves are never mutated
            images = {name: list(buffer) for name, buffer in self._images.items()}
            odometry = list(self._odometry)

        missing = [name for name, frames in images.items() if not frames]
        if missing:
            return None, SkipReason("no_frames", f"no frames from camera {', '.join(missing)}")
        newest = {name: frames[-1][0] for name, frames in images.items()}
        t0 = min(newest.values())
        lagging = min(newest, key=newest.get)
        leading = max(newest, key=newest.get)
        skew = (newest[leading] - t0) / NS
        if skew > cfg.max_camera_skew_s:
            return None, SkipReason("camera_skew", f"camera skew {skew:.3f} s > {cfg.max_camera_skew_s:g} s "
                          f"({lagging} lags behind {leading})")
        if last_t0_ns is not None and t0 <= last_t0_ns:
            return None, SkipReason("no_new_frames", "no new camera frames since the last plan")
        age = (now_ns - t0) / NS if now_ns is not None else float("nan")
        if age > cfg.max_input_age_s:
            return None, SkipReason("input_stale", f"input stale: camera frames at t0 are {age:.2f} s old (> {cfg.max_input_age_s:g} s)")

        # Camera frames nearest the 10 Hz instants.
        offsets_ns = [int(round((cfg.num_frames - 1 - k) * cfg.frame_period_s * NS)) for k in range(cfg.num_frames)]
        stacks, stamps, misalignment = [], [], 0.0
        for name in cfg.cameras:
            frame_stamps = np.array([s for s, _ in images[name]], dtype=np.int64)
            chosen = []
            for offset in offsets_ns:
                target = t0 - offset
                i = int(np.argmin(np.abs(frame_stamps - target)))
                error = abs(int(frame_stamps[i]) - target) / NS
                if error > cfg.frame_tolerance_s:
                    return None, SkipReason("frame_alignment", f"camera {name}: no frame within {cfg.frame_tolerance_s:g} s of "
                                  f"t0-{offset / NS:.1f} s (nearest is {error:.3f} s away)")
                misalignment = max(misalignment, error)
                chosen.append(i)
            stacks.append(np.stack([images[name][i][1] for i in chosen]))
            stamps.append(frame_stamps[chosen])

        # Ego history from odometry.
        if len(odometry) < 2:
            return None, SkipReason("odometry_short", f"odometry: {len(odometry)} message(s) buffered, need at least 2")
        samples = np.array(odometry, dtype=np.float64)
        samples[:, 0] = (samples[:, 0] - t0) / NS  # seconds relative to t0, exact around t0
        odom_lag = -float(samples[-1, 0])
        if odom_lag > cfg.max_odom_staleness_s:
            return None, SkipReason("odometry_stale", f"odometry stale: newest is {odom_lag:.3f} s older than t0 (> {cfg.max_odom_staleness_s:g} s)")
        history_start = -HISTORY_SECONDS
        if samples[0, 0] > history_start + cfg.frame_tolerance_s:
            return None, SkipReason("odometry_coverage", f"odometry covers {-samples[0, 0]:.2f} s before t0, "
                          f"the history needs {HISTORY_SECONDS:.1f} s")
        inside = (samples[:, 0] >= history_start - cfg.max_odom_gap_s) & (samples[:, 0] <= 0.0)
        window = samples[:, 0][inside]
        if len(window) >= 2:
            gap = float(np.max(np.diff(window)))
            if gap > cfg.max_odom_gap_s:
                return None, SkipReason("odometry_gap", f"odometry has a {gap:.2f} s gap in the history window (> {cfg.max_odom_gap_s:g} s)")
        times = -STEP_SECONDS * np.arange(HISTORY_STEPS, -1, -1)
        states = interpolate_odometry(samples, times)
        origin = (float(states[-1, 0]), float(states[-1, 1]), float(states[-1, 2]))
        local, still = hold_at_rest(to_local_frame(states[:, :2], origin), states[:, 3])
        history_xyz = np.column_stack([local, np.zeros(len(local))])  # planar, as in training
        if not np.isfinite(history_xyz).all():
            return None, SkipReason("history_not_finite", "odometry history is not finite")

        frame = SensorFrame(
            t0_ns=int(t0),
            images=np.stack(stacks),
            frame_stamps_ns=np.stack(stamps),
            history_xyz=history_xyz,
            history_tokens=history_bins(history_xyz),
            speed=0.0 if still[-1] else float(states[-1, 3]),  # at rest, as the history says
            pose=(origin[0], origin[1], math.remainder(origin[2], 2 * math.pi)),
            camera_skew_s=skew,
            frame_misalignment_s=misalignment,
            odom_lag_s=odom_lag,
            input_age_s=age,
        )
        frame.assembly_ms = (time.perf_counter() - start) * 1e3
        return frame, ""


# --- From messages to buffers ---------------------------------------------------------------------

class SensorInputs:
    """Incoming messages -> `SensorBuffers`, with every guard on the way: decimation by header
    stamp before deserialisation, bounded image decoding, size fitting and frame-id checks.

    A message is either serialized bytes (the node subscribes raw; `deserialize(data, kind)` turns
    kept ones into messages of kind "CompressedImage", "Image" or "Odometry") or a message
    object. Each call returns None, or (key, reason) for the node's rate-limited log; every
    rejection is also counted in the buffers.
    """

    def __init__(self, buffers: SensorBuffers, compressed: bool, deserialize):
        self.buffers, self.deserialize = buffers, deserialize
        self.image_kind = "CompressedImage" if compressed else "Image"
        self._decode = image_from_compressed if compressed else image_from_raw
        self._decimators = {name: Decimator() for name in (*buffers.config.cameras, "odometry")}
        self._odom_frame: str | None = None
        self.configure()

    def configure(self, limits: ImageLimits = ImageLimits(), camera_max_rate_hz: float = 0.0,
                  odom_max_rate_hz: float = 0.0, frame_id: str = "base_link") -> None:
        self.limits, self.frame_id = limits, frame_id
        for name, decimator in self._decimators.items():
            rate = odom_max_rate_hz if name == "odometry" else camera_max_rate_hz
            # 10 % margin: a stream at exactly the maximum rate, with jitter, is kept whole.
            decimator.min_period_ns = int(0.9 * NS / rate) if rate > 0 else 0

    def _take(self, message, kind: str, decimator: Decimator):
        if isinstance(message, (bytes, bytearray, memoryview)):
            if not decimator.keep(peek_header_stamp_ns(bytes(message[:12]))):
                self.buffers.record(DECIMATED, f"{kind} above its configured maximum rate")
                return None
            if kind != "Odometry" and len(message) > self.limits.max_bytes + 4096:  # + header and fields
                raise InputError(OVERSIZED, f"{kind} message of {len(message)} bytes exceeds max_image_bytes "
                                            f"({self.limits.max_bytes}); not deserialised")
            return self.deserialize(bytes(message), kind)
        return message if decimator.keep(stamp_ns(message.header.stamp)) else None

    def image(self, camera: str, message, now_ns: int | None) -> tuple[str, str] | None:
        if camera not in self._decimators:
            return f"image-{camera}", f"unknown camera {camera!r}"
        try:
            message = self._take(message, self.image_kind, self._decimators[camera])
            if message is None:
                return None
            cfg = self.buffers.config
            size = (cfg.image_width, cfg.image_height)
            image, resized = fit_size(self._decode(message, self.limits, size), *size, cfg.resize_images)
            if resized:
                self.buffers.record(RESIZED, f"camera {camera}: images resized to {size[0]}x{size[1]}")
            reason = self.buffers.add_image(camera, stamp_ns(message.header.stamp), image, now_ns)
            return (f"image-{camera}", reason) if reason else None
        except InputError as error:
            return f"{error.kind}-{camera}", self.buffers.record(error.kind, f"camera {camera}: {error.reason}")
        except Exception as error:  # noqa: BLE001 - no message may stop the node
            return (DECODE_ERRORS, self.buffers.record(DECODE_ERRORS, f"camera {camera}: {type(error).__name__}: "
                                                                     f"{error}"))

    def odometry(self, message, now_ns: int | None) -> tuple[str, str] | None:
        try:
            message = self._take(message, "Odometry", self._decimators["odometry"])
            if message is None:
                return None
            parent, child = message.header.frame_id, message.child_frame_id
            mismatch = None
            if parent != (self._odom_frame or parent) or child not in ("", self.frame_id):
                mismatch = (FRAME_MISMATCH, self.buffers.record(
                    FRAME_MISMATCH, f"odometry in {parent!r} -> {child!r}, expected {self._odom_frame or parent!r} "
                                    f"-> {self.frame_id!r}"))
            reason = self.buffers.add_odometry(*odometry_sample(message), now_ns=now_ns)
            if reason:
                return "odometry", reason
            self._odom_frame = self._odom_frame or parent  # the frame of the first accepted sample
            return mismatch
        except InputError as error:
            return error.kind, self.buffers.record(error.kind, error.reason)
        except Exception as error:  # noqa: BLE001
            return DECODE_ERRORS, self.buffers.record(DECODE_ERRORS, f"odometry: {type(error).__name__}: {error}")
