"""Sensor messages -> numpy, time alignment and history resampling. No ROS imports.

The node hands every decoded camera frame and odometry sample to `SensorBuffers`, which
keeps a short ring buffer per topic and, on each planning tick, assembles a `SensorFrame`:

- t0 is the oldest of the cameras' newest stamps, so every camera has a frame at t0;
- per camera, the `NUM_FRAMES` frames nearest t0-0.3, -0.2, -0.1, 0 s (10 Hz), each within a
  tolerance;
- the ego history: odometry interpolated at the 17 instants t0-1.6 s .. t0 (linear in position,
  shortest arc in yaw), expressed in the t0 vehicle frame and quantised by `history_bins`.

Nothing here raises on bad input: insertion and assembly return a reason string (and count
it), so the node can report it on /diagnostics and carry on. Message conversion takes the
message objects duck-typed (`format`/`data`, `encoding`/`height`/`width`/`step`/`data`), so it
works on rclpy messages, rosbags messages and test doubles alike, and raises `InputError`
(with the counter it belongs to) for the caller to record.
"""
from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass

import cv2
import numpy as np

from .scenarios.scene import NUM_FRAMES
from .trajectory import HISTORY_STEPS, STEP_SECONDS, history_bins, to_local_frame

NS = 1_000_000_000

# Counter names (also the keys the node publishes on /diagnostics).
IMAGES, ODOMETRY = "images", "odometry"  # accepted messages
NAN_ODOMETRY = "nan_odometry"
OUT_OF_ORDER = "out_of_order"
CLOCK_JUMPS = "clock_jumps"
DECODE_ERRORS = "decode_errors"
WRONG_ENCODING = "wrong_encoding"
WRONG_SIZE = "wrong_size"
RESIZED = "resized"
REJECTION_COUNTERS = (NAN_ODOMETRY, OUT_OF_ORDER, CLOCK_JUMPS, DECODE_ERRORS, WRONG_ENCODING, WRONG_SIZE)

RAW_ENCODINGS = {"bgr8": 3, "rgb8": 3, "mono8": 1}
COMPRESSED_FORMATS = ("jpeg", "jpg", "png")


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


def decode_compressed(fmt: str, data) -> np.ndarray:
    """A sensor_msgs/CompressedImage payload (JPEG or PNG) -> BGR uint8 [H, W, 3].

    `format` is free text in ROS ("jpeg", "png", "bgr8; jpeg compressed bgr8", ...); an empty
    format is accepted and sniffed by the decoder. Anything naming another codec is rejected.
    """
    text = (fmt or "").lower()
    if text and not any(name in text for name in COMPRESSED_FORMATS):
        raise InputError(WRONG_ENCODING, f"unsupported CompressedImage format {fmt!r} (expected jpeg or png)")
    buffer = _bytes(data)
    if buffer.size == 0:
        raise InputError(DECODE_ERRORS, "empty CompressedImage")
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(DECODE_ERRORS, f"could not decode a {len(buffer)}-byte {fmt or 'compressed'} image")
    return image


def decode_raw(encoding: str, height: int, width: int, step: int, data, is_bigendian: int = 0) -> np.ndarray:
    """A sensor_msgs/Image (bgr8, rgb8 or mono8) -> BGR uint8 [H, W, 3]."""
    channels = RAW_ENCODINGS.get((encoding or "").lower())
    if channels is None:
        raise InputError(WRONG_ENCODING, f"unsupported Image encoding {encoding!r} (expected one of "
                                         f"{', '.join(RAW_ENCODINGS)})")
    height, width, step = int(height), int(width), int(step)
    if height <= 0 or width <= 0:
        raise InputError(DECODE_ERRORS, f"empty Image ({width}x{height})")
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


def image_from_compressed(message) -> np.ndarray:
    return decode_compressed(message.format, message.data)


def image_from_raw(message) -> np.ndarray:
    return decode_raw(message.encoding, message.height, message.width, message.step, message.data,
                      getattr(message, "is_bigendian", 0))


def fit_size(image: np.ndarray, width: int, height: int, resize: bool) -> tuple[np.ndarray, bool]:
    """The image at the model's input size: unchanged, resized (returns True) or rejected."""
    if image.shape[:2] == (height, width):
        return image, False
    if not resize:
        raise InputError(WRONG_SIZE, f"image is {image.shape[1]}x{image.shape[0]}, the model expects "
                                     f"{width}x{height} (resize_images is off)")
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA), True


def yaw_from_quaternion(x: float, y: float, z: float, w: float) -> float:
    """Heading (rotation about z) of an orientation quaternion."""
    return math.atan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z))


def odometry_sample(message) -> tuple[int, float, float, float, float]:
    """A nav_msgs/Odometry -> (stamp ns, x, y, yaw, forward speed)."""
    stamp = message.header.stamp
    pose = message.pose.pose
    q = pose.orientation
    return (stamp_ns(stamp), float(pose.position.x), float(pose.position.y),
            yaw_from_quaternion(q.x, q.y, q.z, q.w), float(message.twist.twist.linear.x))


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * NS + int(stamp.nanosec)


# --- Alignment ------------------------------------------------------------------------------------

@dataclass
class SensingConfig:
    cameras: tuple[str, ...]
    image_width: int = 96
    image_height: int = 48
    num_frames: int = NUM_FRAMES
    frame_period_s: float = STEP_SECONDS
    frame_tolerance_s: float = 0.04  # a chosen frame may be this far from its target instant
    max_camera_skew_s: float = 0.15  # spread of the cameras' newest stamps
    max_odom_staleness_s: float = 0.2  # newest odometry may be this much older than t0
    max_odom_gap_s: float = 0.5  # largest gap between odometry samples inside the history window
    max_input_age_s: float = 1.0  # skip when t0 is older than this (a dead camera stream)
    clock_jump_threshold_s: float = 1.0  # backward jumps above this reset every buffer
    buffer_seconds: float = 3.0
    resize_images: bool = True

    @property
    def history_seconds(self) -> float:
        return HISTORY_STEPS * STEP_SECONDS


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
        self.generation = 0  # bumped by every reset: stamps from before it are another timeline

    # -- bookkeeping

    def record(self, kind: str, reason: str) -> str:
        """Count a rejected input (or any event) and remember its reason. Returns the reason."""
        with self._lock:
            self.counters[kind] += 1
            self.last_reasons[kind] = reason
        return reason

    def reset(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self.generation += 1
        for buffer in self._images.values():
            buffer.clear()
        self._odometry.clear()

    def _jump(self, reason: str) -> None:
        """A backward jump in time (a bag loop): everything buffered is from another timeline."""
        self._clear()
        self.counters[CLOCK_JUMPS] += 1
        self.last_reasons[CLOCK_JUMPS] = reason
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

    def _accept_stamp(self, buffer: deque, stamp: int, what: str) -> str | None:
        """Order check for a new stamp (lock held). None if it may be appended."""
        if not buffer or stamp > buffer[-1][0]:
            return None
        back = (buffer[-1][0] - stamp) / NS
        if back > self.config.clock_jump_threshold_s:
            self._jump(f"{what} stamps jumped back {back:.2f} s; buffers reset")
            return None
        reason = (f"{what}: duplicate stamp" if back == 0 else
                  f"{what}: stamp {back * 1e3:.0f} ms older than the newest one; dropped")
        self.counters[OUT_OF_ORDER] += 1
        self.last_reasons[OUT_OF_ORDER] = reason
        return reason

    def _prune(self, buffer: deque, newest: int) -> None:
        horizon = newest - int(self.config.buffer_seconds * NS)
        while buffer and buffer[0][0] < horizon:
            buffer.popleft()

    # -- insertion

    def add_image(self, camera: str, stamp: int, image: np.ndarray) -> str | None:
        """Insert a decoded BGR frame at the model's size. Returns a reason if it was rejected."""
        with self._lock:
            buffer = self._images.get(camera)
            if buffer is None:
                return f"unknown camera {camera!r}"
            reason = self._accept_stamp(buffer, stamp, f"camera {camera}")
            if reason:
                return reason
            buffer = self._images[camera]
            buffer.append((stamp, image))
            self._prune(buffer, stamp)
            self.counters[IMAGES] += 1
        return None

    def add_odometry(self, stamp: int, x: float, y: float, yaw: float, speed: float) -> str | None:
        """Insert one odometry sample. Returns a reason if it was rejected."""
        if not all(math.isfinite(v) for v in (x, y, yaw, speed)):
            return self.record(NAN_ODOMETRY, f"odometry with a non-finite value "
                                             f"(x={x}, y={y}, yaw={yaw}, speed={speed}); dropped")
        with self._lock:
            reason = self._accept_stamp(self._odometry, stamp, "odometry")
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
                 ) -> tuple[SensorFrame | None, str]:
        """The SensorFrame for this tick, or (None, why not)."""
        start = time.perf_counter()
        cfg = self.config
        with self._lock:  # snapshot; frames themselves are never mutated
            images = {name: list(buffer) for name, buffer in self._images.items()}
            odometry = list(self._odometry)

        missing = [name for name, frames in images.items() if not frames]
        if missing:
            return None, f"no frames from camera {', '.join(missing)}"
        newest = {name: frames[-1][0] for name, frames in images.items()}
        t0 = min(newest.values())
        lagging = min(newest, key=newest.get)
        leading = max(newest, key=newest.get)
        skew = (newest[leading] - t0) / NS
        if skew > cfg.max_camera_skew_s:
            return None, (f"camera skew {skew:.3f} s > {cfg.max_camera_skew_s:g} s "
                          f"({lagging} lags behind {leading})")
        if last_t0_ns is not None and t0 <= last_t0_ns:
            return None, "no new camera frames since the last plan"
        age = (now_ns - t0) / NS if now_ns is not None else float("nan")
        if age > cfg.max_input_age_s:
            return None, f"input stale: camera frames at t0 are {age:.2f} s old (> {cfg.max_input_age_s:g} s)"

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
                    return None, (f"camera {name}: no frame within {cfg.frame_tolerance_s:g} s of "
                                  f"t0-{offset / NS:.1f} s (nearest is {error:.3f} s away)")
                misalignment = max(misalignment, error)
                chosen.append(i)
            stacks.append(np.stack([images[name][i][1] for i in chosen]))
            stamps.append(frame_stamps[chosen])

        # Ego history from odometry.
        if len(odometry) < 2:
            return None, f"odometry: {len(odometry)} message(s) buffered, need at least 2"
        samples = np.array(odometry, dtype=np.float64)
        samples[:, 0] = (samples[:, 0] - t0) / NS  # seconds relative to t0, exact around t0
        odom_lag = -float(samples[-1, 0])
        if odom_lag > cfg.max_odom_staleness_s:
            return None, f"odometry stale: newest is {odom_lag:.3f} s older than t0 (> {cfg.max_odom_staleness_s:g} s)"
        history_start = -cfg.history_seconds
        if samples[0, 0] > history_start + cfg.frame_tolerance_s:
            return None, (f"odometry covers {-samples[0, 0]:.2f} s before t0, "
                          f"the history needs {cfg.history_seconds:.1f} s")
        inside = (samples[:, 0] >= history_start - cfg.max_odom_gap_s) & (samples[:, 0] <= 0.0)
        window = samples[:, 0][inside]
        if len(window) >= 2:
            gap = float(np.max(np.diff(window)))
            if gap > cfg.max_odom_gap_s:
                return None, f"odometry has a {gap:.2f} s gap in the history window (> {cfg.max_odom_gap_s:g} s)"
        times = -STEP_SECONDS * np.arange(HISTORY_STEPS, -1, -1)
        states = interpolate_odometry(samples, times)
        origin = (float(states[-1, 0]), float(states[-1, 1]), float(states[-1, 2]))
        local = to_local_frame(states[:, :2], origin)
        history_xyz = np.column_stack([local, np.zeros(len(local))])  # planar, as in training
        if not np.isfinite(history_xyz).all():
            return None, "odometry history is not finite"

        frame = SensorFrame(
            t0_ns=int(t0),
            images=np.stack(stacks),
            frame_stamps_ns=np.stack(stamps),
            history_xyz=history_xyz,
            history_tokens=history_bins(history_xyz),
            speed=float(states[-1, 3]),
            pose=(origin[0], origin[1], math.remainder(origin[2], 2 * math.pi)),
            camera_skew_s=skew,
            frame_misalignment_s=misalignment,
            odom_lag_s=odom_lag,
            input_age_s=age,
        )
        frame.assembly_ms = (time.perf_counter() - start) * 1e3
        return frame, ""
