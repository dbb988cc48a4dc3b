"""Road geometry: the ego's route as a centreline sampled by arc length.

The route is a chain of constant-curvature pieces (straight, gentle curve, intersection
turn). Everything lateral is measured from the centre of lane 0 (the rightmost lane of
the ego's direction), positive to the left, so lane i's centre sits at offset i * width.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LANE_WIDTH = 3.5
SAMPLE_SPACING = 0.25  # metres between centreline samples


@dataclass
class Route:
    """A centreline (x, y, heading) sampled every SAMPLE_SPACING metres from s = 0."""

    pieces: list[tuple[float, float]]  # (length m, curvature 1/m)
    num_lanes: int = 2
    lane_width: float = LANE_WIDTH
    start_xy: tuple[float, float] = (0.0, 0.0)
    start_heading: float = 0.0
    xy: np.ndarray = field(init=False, repr=False)
    heading: np.ndarray = field(init=False, repr=False)
    curvature: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        curvature = np.concatenate(
            [np.full(max(int(round(length / SAMPLE_SPACING)), 1), kappa) for length, kappa in self.pieces]
        )
        heading = self.start_heading + np.concatenate([[0.0], np.cumsum(curvature[:-1] * SAMPLE_SPACING)])
        # Midpoint heading integration keeps arcs closed to within millimetres.
        mid = heading + 0.5 * curvature * SAMPLE_SPACING
        steps = SAMPLE_SPACING * np.stack([np.cos(mid), np.sin(mid)], axis=1)
        xy = np.concatenate([[self.start_xy], np.asarray(self.start_xy) + np.cumsum(steps, axis=0)])[:-1]
        self.xy, self.heading, self.curvature = xy, heading, curvature

    @property
    def length(self) -> float:
        return (len(self.curvature) - 1) * SAMPLE_SPACING

    def pose(self, s: np.ndarray | float, offset: np.ndarray | float = 0.0):
        """World (x, y, heading) at arc length s and lateral offset (left positive)."""
        s = np.clip(np.asarray(s, dtype=float), 0.0, self.length)
        position = s / SAMPLE_SPACING
        index = np.minimum(position.astype(int), len(self.curvature) - 2)
        frac = position - index
        heading = self.heading[index] + frac * (self.heading[index + 1] - self.heading[index])
        xy = self.xy[index] + frac[..., None] * (self.xy[index + 1] - self.xy[index])
        normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
        xy = xy + np.asarray(offset, dtype=float)[..., None] * normal
        return xy[..., 0], xy[..., 1], heading

    def curvature_at(self, s: np.ndarray | float) -> np.ndarray:
        index = np.clip((np.asarray(s) / SAMPLE_SPACING).astype(int), 0, len(self.curvature) - 1)
        return self.curvature[index]

    def edge_offsets(self) -> tuple[float, float]:
        """Right and left edges of the ego-direction carriageway."""
        return -0.5 * self.lane_width, (self.num_lanes - 0.5) * self.lane_width


def strip_polygons(route: Route, s0: float, s1: float, left: float, right: float, step: float = 4.0):
    """Quads covering the band [right, left] of the route between s0 and s1.

    Short quads keep the pinhole projection close to the true curved surface and make
    near-plane clipping local.
    """
    s0, s1 = max(s0, 0.0), min(s1, route.length)
    ss = np.arange(s0, s1 + 1e-6, step)
    if len(ss) < 2:
        return []
    lx, ly, _ = route.pose(ss, left)
    rx, ry, _ = route.pose(ss, right)
    return [
        np.array([[rx[i], ry[i]], [rx[i + 1], ry[i + 1]], [lx[i + 1], ly[i + 1]], [lx[i], ly[i]]])
        for i in range(len(ss) - 1)
    ]


def marking_polygons(route: Route, offset: float, s0: float, s1: float, dashed: bool, width: float = 0.15):
    """Lane-marking stripes along a lateral offset: 3 m dashes every 9 m, or one solid line."""
    if not dashed:
        return strip_polygons(route, s0, s1, offset + width / 2, offset - width / 2)
    polygons = []
    for start in np.arange(s0 - s0 % 9.0, s1, 9.0):
        polygons += strip_polygons(route, start, start + 3.0, offset + width / 2, offset - width / 2, step=3.0)
    return polygons


def rectangle(center_xy, heading: float, length: float, width: float) -> np.ndarray:
    """Corners of a ground rectangle (counter-clockwise) centred at center_xy."""
    c, s = np.cos(heading), np.sin(heading)
    half = np.array([[length, width], [length, -width], [-length, -width], [-length, width]]) / 2
    rotation = np.array([[c, -s], [s, c]])
    return np.asarray(center_xy) + half @ rotation.T
