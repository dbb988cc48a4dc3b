"""A rosbag2 drive from real odometry: the comma2k19 sample segment with generated camera frames.

A comma2k19 segment (comma.ai's public driving data set, MIT licence) has global poses at 20 Hz: ECEF
positions, velocities and device orientations. They become nav_msgs/Odometry in a local ENU
frame anchored at the first pose (x east, y north; yaw from the device's forward axis), with
the forward speed from the velocity. The segment has no video here, so camera frames are
drawn: a road with dashed lane markings that move with the distance driven and bend with the
measured yaw rate. Stamps start at the same simulated epoch as `data.bag`'s drives, /clock runs
at 100 Hz, cameras at 10 Hz.

    python -m chain_spec_ros.replay.comma SEGMENT_DIR OUT [--seconds 30]
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import cv2
import numpy as np

from ..constants import IMAGE_HEIGHT, IMAGE_WIDTH
from ..data.bag import (CLOCK_TOPIC, CLOCK_TYPE, EPOCH_NS, IMAGE_TYPE, ODOM_TOPIC, ODOM_TYPE, STORAGES, camera_topic,
                        ros2_typestore)
from ..scenarios.render import DEFAULT_CAMERAS

WGS84_A = 6378137.0
WGS84_E2 = 6.69437999014e-3
TICK_NS = 10_000_000


def find_segment(root: str | Path) -> Path:
    """The directory holding `global_pose/` (the root itself or one level below)."""
    root = Path(root)
    if (root / "global_pose").is_dir():
        return root
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if (child / "global_pose").is_dir():
            return child
    raise FileNotFoundError(f"no comma2k19 segment (a global_pose/ directory) under {root}")


def ecef_to_geodetic(p: np.ndarray) -> tuple[float, float]:
    """Latitude and longitude (radians) of an ECEF point (Bowring's method, sub-mm here)."""
    x, y, z = p
    b = WGS84_A * math.sqrt(1 - WGS84_E2)
    ep2 = (WGS84_A**2 - b**2) / b**2
    r = math.hypot(x, y)
    theta = math.atan2(z * WGS84_A, r * b)
    lat = math.atan2(z + ep2 * b * math.sin(theta) ** 3, r - WGS84_E2 * WGS84_A * math.cos(theta) ** 3)
    return lat, math.atan2(y, x)


def ecef_to_enu_matrix(lat: float, lon: float) -> np.ndarray:
    sl, cl, sp, cp = math.sin(lon), math.cos(lon), math.sin(lat), math.cos(lat)
    return np.array([[-sl, cl, 0.0], [-sp * cl, -sp * sl, cp], [cp * cl, cp * sl, sp]])


def quaternion_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrices [N, 3, 3] of quaternions (w, x, y, z) [N, 4]."""
    w, x, y, z = (q / np.linalg.norm(q, axis=1, keepdims=True)).T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def load_odometry(segment: str | Path) -> np.ndarray:
    """[N, 6] rows (t from 0, x east, y north, yaw, forward speed, yaw rate) in ENU at the first pose."""
    pose = find_segment(segment) / "global_pose"
    t = np.load(pose / "frame_times")
    positions = np.load(pose / "frame_positions")
    velocities = np.load(pose / "frame_velocities")
    orientations = np.load(pose / "frame_orientations")
    to_enu = ecef_to_enu_matrix(*ecef_to_geodetic(positions[0]))
    enu = (positions - positions[0]) @ to_enu.T
    forward = quaternion_matrix(orientations)[:, :, 0] @ to_enu.T  # the device frame's x axis
    yaw = np.unwrap(np.arctan2(forward[:, 1], forward[:, 0]))
    velocity = velocities @ to_enu.T
    speed = np.einsum("ij,ij->i", velocity[:, :2], np.stack([np.cos(yaw), np.sin(yaw)], 1))
    yaw_rate = np.gradient(yaw, t)
    return np.column_stack([t - t[0], enu[:, 0], enu[:, 1], yaw, speed, yaw_rate])


def draw_road(width: int, height: int, distance: float, curvature: float, fov_deg: float) -> np.ndarray:
    """A BGR road view: sky, grass, asphalt, edge lines and a dashed centre line that moves
    with `distance` and bends with `curvature` (1/m), seen by a pinhole camera 1.5 m up."""
    image = np.empty((height, width, 3), np.uint8)
    horizon = height // 2
    image[:horizon] = (235, 205, 160)
    image[horizon:] = (60, 130, 70)
    focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2)

    def project(forward, lateral):
        u = width / 2 - focal * lateral / forward
        v = horizon + focal * 1.5 / forward
        return u, v

    ahead = np.linspace(3.0, 120.0, 80)
    bend = 0.5 * curvature * ahead**2
    road = [project(f, 5.0 + b) for f, b in zip(ahead, bend)] + \
           [project(f, -5.0 + b) for f, b in zip(ahead[::-1], bend[::-1])]
    cv2.fillPoly(image, [np.array(road, np.int32)], (90, 90, 90))
    for offset in (4.8, -4.8):
        edge = np.array([project(f, offset + b) for f, b in zip(ahead, bend)], np.int32)
        cv2.polylines(image, [edge], False, (235, 235, 235), 1)
    phase = distance % 6.0
    for start in np.arange(3.0 - phase, 120.0, 6.0):
        if start < 3.0:
            continue
        segment = np.linspace(start, start + 3.0, 4)
        dash = np.array([project(f, 0.5 * curvature * f**2) for f in segment], np.int32)
        cv2.polylines(image, [dash], False, (220, 220, 220), 1)
    return image


def write_comma_bag(segment: str | Path, out: str | Path, seconds: float | None = None, storage: str = "mcap",
                    width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT, jpeg_quality: int = 90) -> dict:
    """Write the segment's odometry (20 Hz), generated camera frames (10 Hz) and /clock (100 Hz)."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {sorted(STORAGES)}, not {storage!r}")
    from rosbags.rosbag2 import Writer

    odometry = load_odometry(segment)
    if seconds is not None:
        odometry = odometry[odometry[:, 0] <= seconds]
    t = odometry[:, 0]
    distance = np.concatenate([[0.0], np.cumsum(np.diff(t) * 0.5 * (odometry[1:, 4] + odometry[:-1, 4]))])
    ts = ros2_typestore()
    T = ts.types
    topics = {CLOCK_TOPIC: CLOCK_TYPE, ODOM_TOPIC: ODOM_TYPE,
              **{camera_topic(c.name): IMAGE_TYPE for c in DEFAULT_CAMERAS}}
    counts = dict.fromkeys(topics, 0)

    def stamp(ns):
        return T["builtin_interfaces/msg/Time"](sec=ns // 10**9, nanosec=ns % 10**9)

    def header(ns, frame):
        return T["std_msgs/msg/Header"](stamp=stamp(ns), frame_id=frame)

    events = []
    for i, row in enumerate(odometry):
        events.append((EPOCH_NS + int(round(row[0] * 1e9)), 1, ODOM_TOPIC, i))
    end_ns = EPOCH_NS + int(t[-1] * 1e9)
    for ns in range(EPOCH_NS, end_ns + 1, TICK_NS):
        events.append((ns, 0, CLOCK_TOPIC, None))
        if (ns - EPOCH_NS) % (10 * TICK_NS) == 0:
            events.append((ns, 2, "camera", None))
    events.sort(key=lambda e: (e[0], e[1]))

    vector = T["geometry_msgs/msg/Vector3"]
    with Writer(Path(out), version=9, storage_plugin=STORAGES[storage]) as writer:
        connections = {topic: writer.add_connection(topic, msgtype, typestore=ts) for topic, msgtype in topics.items()}

        def write(topic, ns, message):
            writer.write(connections[topic], ns, ts.serialize_cdr(message, topics[topic]))
            counts[topic] += 1

        for ns, _, kind, index in events:
            if kind == CLOCK_TOPIC:
                write(CLOCK_TOPIC, ns, T[CLOCK_TYPE](clock=stamp(ns)))
            elif kind == ODOM_TOPIC:
                _, x, y, yaw, speed, yaw_rate = odometry[index]
                pose = T["geometry_msgs/msg/Pose"](
                    position=T["geometry_msgs/msg/Point"](x=float(x), y=float(y), z=0.0),
                    orientation=T["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=math.sin(yaw / 2),
                                                                  w=math.cos(yaw / 2)))
                twist = T["geometry_msgs/msg/Twist"](linear=vector(x=float(speed), y=0.0, z=0.0),
                                                     angular=vector(x=0.0, y=0.0, z=float(yaw_rate)))
                write(ODOM_TOPIC, ns, T[ODOM_TYPE](
                    header=header(ns, "odom"), child_frame_id="base_link",
                    pose=T["geometry_msgs/msg/PoseWithCovariance"](pose=pose, covariance=np.zeros(36)),
                    twist=T["geometry_msgs/msg/TwistWithCovariance"](twist=twist, covariance=np.zeros(36))))
            else:
                now = (ns - EPOCH_NS) / 1e9
                speed = float(np.interp(now, t, odometry[:, 4]))
                yaw_rate = float(np.interp(now, t, odometry[:, 5]))
                curvature = yaw_rate / speed if speed > 1.0 else 0.0
                driven = float(np.interp(now, t, distance))
                for camera in DEFAULT_CAMERAS:
                    image = draw_road(width, height, driven, curvature, camera.horizontal_fov_deg)
                    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                    write(camera_topic(camera.name), ns, T[IMAGE_TYPE](
                        header=header(ns, f"{camera.name}_optical"), format="jpeg", data=jpeg.ravel()))
    return {"path": str(out), "duration": float(t[-1]), "counts": counts,
            "distance_m": float(distance[-1]), "mean_speed": float(odometry[:, 4].mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("segment", help="comma2k19 segment directory (or its parent)")
    parser.add_argument("out", help="new bag directory")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--storage", default="mcap", choices=sorted(STORAGES))
    args = parser.parse_args(argv)
    summary = write_comma_bag(args.segment, args.out, args.seconds, args.storage)
    print(f"wrote {summary['path']}: {summary['duration']:.1f} s, {summary['distance_m']:.0f} m, "
          f"{summary['counts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
