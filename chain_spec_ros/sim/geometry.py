"""Plane geometry the episode and its metrics need: boxes, their overlap, and where a point is
along the route."""
from __future__ import annotations

import numpy as np

from ..scenarios.road import SAMPLE_SPACING, Route

SEARCH_BEHIND, SEARCH_AHEAD = 10.0, 40.0  # m around the previous arc length: no jumping to another arm of a turn


def box_corners(x: float, y: float, yaw: float, length: float, width: float) -> np.ndarray:
    """Corners [4, 2] of a box centred at (x, y) with heading yaw, counter-clockwise from the
    front left."""
    c, s = np.cos(yaw), np.sin(yaw)
    half = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]]) * np.array([length, width]) / 2
    return np.array([x, y]) + half @ np.array([[c, s], [-s, c]])


def boxes_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two convex polygons [N, 2] overlap (separating axis theorem: two convex shapes are
    apart exactly when some edge normal of one of them separates their projections)."""
    for polygon in (a, b):
        edges = np.roll(polygon, -1, axis=0) - polygon
        normals = np.column_stack([-edges[:, 1], edges[:, 0]])
        pa, pb = a @ normals.T, b @ normals.T  # projections [corners, axes]
        if np.any((pa.max(axis=0) < pb.min(axis=0)) | (pb.max(axis=0) < pa.min(axis=0))):
            return False
    return True


def plan_path_in_world(origin: tuple[float, float, float], trajectory_xy: np.ndarray) -> np.ndarray:
    """A plan's path [N + 1, 2] in the world: the ego at its t0 pose `origin` (x, y, yaw) first,
    then its N waypoints, given in the t0 frame (x forward, y left)."""
    ox, oy, yaw = origin
    c, s = np.cos(yaw), np.sin(yaw)
    local = np.vstack([[0.0, 0.0], np.asarray(trajectory_xy, dtype=np.float64)])
    return np.column_stack([ox + c * local[:, 0] - s * local[:, 1], oy + s * local[:, 0] + c * local[:, 1]])


def route_position(route: Route, x: float, y: float, s_hint: float | None = None) -> tuple[float, float]:
    """(arc length, lateral offset, left positive) of a point, from the nearest centreline sample
    within a window around `s_hint` (the previous arc length; None searches the whole route),
    refined along that sample's tangent."""
    first, last = 0, len(route.xy)
    if s_hint is not None:
        first = max(int((s_hint - SEARCH_BEHIND) / SAMPLE_SPACING), 0)
        last = min(int((s_hint + SEARCH_AHEAD) / SAMPLE_SPACING) + 1, len(route.xy))
        first = min(first, last - 1)  # past the end of the route: measure from its last sample
    window = route.xy[first:last]
    i = first + int(np.argmin(np.sum((window - [x, y]) ** 2, axis=1)))
    heading = route.heading[i]
    dx, dy = x - route.xy[i, 0], y - route.xy[i, 1]
    along = np.cos(heading) * dx + np.sin(heading) * dy
    offset = -np.sin(heading) * dx + np.cos(heading) * dy
    return float(i * SAMPLE_SPACING + along), float(offset)


def inside_convex(polygon: np.ndarray, point: np.ndarray) -> bool:
    """Whether a point lies inside a convex polygon [N, 2] (either winding)."""
    edges = np.roll(polygon, -1, axis=0) - polygon
    to_point = point - polygon
    cross = edges[:, 0] * to_point[:, 1] - edges[:, 1] * to_point[:, 0]
    return bool((cross >= 0).all() or (cross <= 0).all())
