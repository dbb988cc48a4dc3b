"""A small pinhole-camera rasteriser for the scenario world (OpenCV polygons, painter's order)."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..constants import IMAGE_HEIGHT, IMAGE_WIDTH
from .actors import LIGHT_COLOURS, Actor
from .events import World
from .road import marking_polygons, strip_polygons

SUPERSAMPLE = 2  # draw at 2x and average down, so far objects blend in instead of vanishing
NEAR = 0.3
LOOK_BEHIND, LOOK_AHEAD = 5.0, 140.0
ROAD_COLOUR, GRASS_COLOUR, MARKING_COLOUR = (80, 80, 80), (70, 120, 80), (235, 235, 235)


@dataclass(frozen=True)
class Camera:
    """A camera rigidly mounted on the ego: x forward, y left, z up in base_link."""

    name: str
    horizontal_fov_deg: float
    x: float = 1.5
    y: float = 0.0
    z: float = 1.5
    yaw: float = 0.0

    def intrinsics(self, width: int, height: int) -> np.ndarray:
        focal = 0.5 * width / np.tan(np.radians(self.horizontal_fov_deg) / 2)
        return np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]])


DEFAULT_CAMERAS = (Camera("front_wide", 100.0), Camera("front_tele", 35.0))


class Renderer:
    def __init__(self, cameras=DEFAULT_CAMERAS, width: int = IMAGE_WIDTH, height: int = IMAGE_HEIGHT):
        self.cameras, self.width, self.height = cameras, width, height
        self._sky = self._sky_gradient()

    def _sky_gradient(self) -> np.ndarray:
        h, w = self.height * SUPERSAMPLE, self.width * SUPERSAMPLE
        rows = np.linspace(0, 1, h // 2)[:, None]
        sky = (np.array([235, 200, 150]) * (1 - rows) + np.array([245, 225, 200]) * rows).astype(np.uint8)
        image = np.empty((h, w, 3), np.uint8)
        image[: h // 2] = sky[:, None, :]
        image[h // 2 :] = GRASS_COLOUR
        return image

    def render(self, world: World, ego_pose: tuple[float, float, float], ego_s: float, t: float) -> np.ndarray:
        """Frames of every camera at time t: uint8 [num_cameras, H, W, 3] (BGR)."""
        ground = self._ground_polygons(world, ego_s)
        return np.stack([self._render_camera(camera, world, ego_pose, ground, t) for camera in self.cameras])

    def _ground_polygons(self, world: World, ego_s: float):
        route = world.route
        s0, s1 = ego_s - LOOK_BEHIND, ego_s + LOOK_AHEAD
        right, left = route.edge_offsets()
        polygons = []
        for extra in world.extra_routes:
            polygons += [(p, ROAD_COLOUR) for p in strip_polygons(extra, s0, s1, left, right)]
        if world.lane_end_s is None:
            polygons += [(p, ROAD_COLOUR) for p in strip_polygons(route, s0, s1, left, right)]
        else:  # lane 0 tapers away over 30 m after its end
            polygons += [(p, ROAD_COLOUR) for p in strip_polygons(route, s0, s1, left, 0.5 * route.lane_width)]
            polygons += [(p, ROAD_COLOUR) for p in strip_polygons(route, s0, world.lane_end_s, 0.5 * route.lane_width, right)]
            polygons += [(p, ROAD_COLOUR) for p in strip_polygons(route, world.lane_end_s, world.lane_end_s + 30,
                                                                  0.5 * route.lane_width, 0.5 * route.lane_width - 0.3)]
        polygons += world.surfaces
        for lane in range(1, route.num_lanes):
            offset = (lane - 0.5) * route.lane_width
            end = s1 if world.lane_end_s is None else world.lane_end_s
            polygons += [(p, MARKING_COLOUR) for p in marking_polygons(route, offset, s0, end, dashed=True)]
        for edge in (right, left):
            polygons += [(p, MARKING_COLOUR) for p in marking_polygons(route, edge, s0, s1, dashed=False)]
        return polygons

    def _render_camera(self, camera: Camera, world: World, ego_pose, ground, t: float) -> np.ndarray:
        image = self._sky.copy()
        to_camera = _world_to_camera(camera, ego_pose)
        K = camera.intrinsics(self.width * SUPERSAMPLE, self.height * SUPERSAMPLE)
        for polygon, colour in ground:
            points = np.column_stack([polygon, np.zeros(len(polygon))])
            _fill(image, K, to_camera(points), colour)
        faces = []
        for actor in world.actors:
            for corners, colour in _actor_boxes(actor, t):
                faces += _box_faces(to_camera(corners), colour)
        faces.sort(key=lambda face: -face[0])
        for _, points, colour in faces:
            _fill(image, K, points, colour)
        return cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)


def _world_to_camera(camera: Camera, ego_pose):
    """A function mapping world points [N, 3] to camera coordinates (x right, y down, z forward)."""
    ex, ey, eyaw = ego_pose
    yaw = eyaw + camera.yaw
    cx = ex + camera.x * np.cos(eyaw) - camera.y * np.sin(eyaw)
    cy = ey + camera.x * np.sin(eyaw) + camera.y * np.cos(eyaw)
    c, s = np.cos(yaw), np.sin(yaw)

    def transform(points: np.ndarray) -> np.ndarray:
        dx, dy, dz = points[:, 0] - cx, points[:, 1] - cy, points[:, 2] - camera.z
        forward, left = c * dx + s * dy, -s * dx + c * dy
        return np.column_stack([-left, -dz, forward])

    return transform


def _clip_near(points: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a polygon (camera coordinates) against z >= NEAR."""
    out = []
    for i in range(len(points)):
        a, b = points[i], points[(i + 1) % len(points)]
        if a[2] >= NEAR:
            out.append(a)
        if (a[2] >= NEAR) != (b[2] >= NEAR):
            out.append(a + (b - a) * (NEAR - a[2]) / (b[2] - a[2]))
    return np.array(out)


def _fill(image: np.ndarray, K: np.ndarray, points: np.ndarray, colour) -> None:
    if points[:, 2].max() < NEAR:
        return
    points = _clip_near(points)
    if len(points) < 3:
        return
    pixels = (points @ K.T)[:, :2] / points[:, 2:3]
    if np.abs(pixels).max() > 1e5:
        return
    cv2.fillPoly(image, [np.round(pixels * 16).astype(np.int32)], colour, lineType=cv2.LINE_AA, shift=4)


def _box(center_xy, yaw, length, width, z0, z1, colour):
    c, s = np.cos(yaw), np.sin(yaw)
    half = np.array([[1, 1], [1, -1], [-1, -1], [-1, 1]]) * np.array([length, width]) / 2
    xy = np.asarray(center_xy) + half @ np.array([[c, s], [-s, c]])
    corners = np.vstack([np.column_stack([xy, np.full(4, z0)]), np.column_stack([xy, np.full(4, z1)])])
    return corners, colour


def _actor_boxes(actor: Actor, t: float):
    """An actor as a few coloured boxes (body, head, housing, lamp, panel)."""
    x, y, yaw = actor.motion.pose(t)
    length, width, height = actor.size
    kind = actor.kind
    if kind in ("car", "truck"):
        body = _box((x, y), yaw, length, width, 0.3, height * 0.65, actor.colour)
        cabin = _box((x - 0.1 * length, y), yaw, length * 0.55, width * 0.9, height * 0.65, height,
                      tuple(int(v * 0.6) for v in actor.colour))
        return [body, cabin] if kind == "car" else [body, _box((x, y), yaw, length, width, height * 0.6, height, actor.colour)]
    if kind in ("pedestrian", "cyclist"):
        parts = [_box((x, y), yaw, length, width, 0.0, height * 0.82, actor.colour),
                 _box((x, y), yaw, 0.3, 0.3, height * 0.82, height, (120, 160, 210))]
        if kind == "cyclist":
            parts.append(_box((x, y), yaw, length, 0.15, 0.0, 0.9, (30, 30, 30)))
        return parts
    if kind == "cone":
        return [_box((x, y), yaw, length, width, 0.0, height, actor.colour)]
    pole = _box((x, y), yaw, 0.15, 0.15, 0.0, height, (60, 60, 60))
    # Signs and lights face the oncoming ego: their panel normal points back along the route.
    if kind == "traffic_light":
        housing = _box((x, y), yaw, 0.4, 1.0, height, height + 2.4, (25, 25, 25))
        lit = actor.light(t)
        level = {"red": 2, "yellow": 1, "green": 0}[lit]
        lamp_x, lamp_y = x - 0.25 * np.cos(yaw), y - 0.25 * np.sin(yaw)
        z = height + 0.1 + level * 0.78
        lamp = _box((lamp_x, lamp_y), yaw, 0.1, 0.8, z, z + 0.7, LIGHT_COLOURS[lit])
        return [pole, housing, lamp]
    panel_z = height
    panel = _box((x, y), yaw, 0.1, width, panel_z, panel_z + width, actor.colour)
    parts = [pole, panel]
    if actor.arrow:  # a white block on the arrow's side of the panel
        side = 1.0 if actor.arrow == "left" else -1.0
        ax = x - 0.1 * np.cos(yaw) - side * 0.25 * width * np.sin(yaw)
        ay = y - 0.1 * np.sin(yaw) + side * 0.25 * width * np.cos(yaw)
        parts.append(_box((ax, ay), yaw, 0.05, width * 0.4, panel_z + 0.25 * width, panel_z + 0.75 * width,
                          (250, 250, 250)))
    return parts


_FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7))
_SHADE = (0.7, 1.0, 0.9, 0.8, 0.9, 0.8)


def _box_faces(corners: np.ndarray, colour):
    """The faces of a box as (depth, points, shaded colour), for painter's ordering."""
    faces = []
    for face, shade in zip(_FACES, _SHADE):
        points = corners[list(face)]
        if points[:, 2].max() < NEAR:
            continue
        faces.append((float(np.linalg.norm(points.mean(axis=0))), points, tuple(int(c * shade) for c in colour)))
    return faces
