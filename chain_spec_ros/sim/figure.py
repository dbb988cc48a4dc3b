"""A bird's-eye picture of one episode: the road, the actors, the driven path (coloured by speed),
the scripted driver's path for comparison, the plans at a few ticks and what the CoC said then."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from ..scenarios.ego import SIM_DT
from ..scenarios.road import Route
from .episode import Episode
from .geometry import box_corners
from .vehicle import EGO_LENGTH, EGO_WIDTH

SHOWN_PLANS = 4  # plans drawn (evenly spaced over the episode, the first always)
MARGIN_M = 12.0
MIN_HALF_VIEW_M = (30.0, 10.0)  # a standing ego still shows the junction around it
LIGHT_RGB = {"red": "#e41a1c", "yellow": "#ffbf00", "green": "#2ca02c", "": "#555555"}
PLAN_COLOURS = ("#1f77b4", "#9467bd", "#ff7f0e", "#17becf")


def save_episode_png(episode: Episode, metrics: dict, mode: str, path: str | Path) -> Path:
    """Draw the episode into `path` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    start = episode.start_index
    shown = _shown_plans(episode)
    # Snapshot instants: the shown plans' ticks, or (no planner) evenly over the closed loop.
    snapshots = ([episode.plans[i].t for i in shown] if shown else
                 list(np.linspace(episode.t[start], episode.t[-1], SHOWN_PLANS)))
    xs = np.concatenate([episode.x[start:]] + [episode.plans[i].world_path[:, 0] for i in shown])
    ys = np.concatenate([episode.y[start:]] + [episode.plans[i].world_path[:, 1] for i in shown])
    centre = np.array([xs.min() + xs.max(), ys.min() + ys.max()]) / 2
    half = np.maximum([(xs.max() - xs.min()) / 2 + MARGIN_M, (ys.max() - ys.min()) / 2 + MARGIN_M], MIN_HALF_VIEW_M)
    bounds = (centre[0] - half[0], centre[0] + half[0], centre[1] - half[1], centre[1] + half[1])
    width = bounds[1] - bounds[0]
    height = bounds[3] - bounds[2]
    figure_width = 12.0
    map_height = float(np.clip(figure_width * height / width, 2.5, 9.0))
    # The CoCs of the shown plans go under the map: as much room as their wrapped lines need.
    text = "\n".join(textwrap.fill(f"t={episode.plans[i].t:.1f} s [{episode.plans[i].decision or '?'}] "
                                   f"{_printable(episode.plans[i].coc)}", 150, subsequent_indent="    ")
                     for i in shown)
    text_height = 0.5 + 0.14 * (text.count("\n") + 1 if text else 0)
    total = map_height + 0.6 + text_height
    figure = plt.figure(figsize=(figure_width, total), dpi=110)
    ax = figure.add_axes([0.05, text_height / total, 0.86, map_height / total])
    ax.set_facecolor("#cfe3c8")  # grass

    for route in [*episode.world.extra_routes, episode.world.route]:
        _draw_road(ax, route, episode)
    for polygon, colour in episode.world.surfaces:
        ax.fill(*np.asarray(polygon).T, color=_rgb(colour), zorder=2, lw=0)

    t_first = episode.plans[0].t if episode.plans else episode.t[start]
    for actor in episode.world.actors:
        trail = np.array([actor.motion.pose(t)[:2] for t in episode.t[start::10]])
        ax.plot(*trail.T, color="#444444", lw=0.8, ls=":", zorder=3)
        for k, t in enumerate(snapshots):
            x, y, yaw = actor.motion.pose(t)
            corners = box_corners(x, y, yaw, max(actor.size[0], 0.6), max(actor.size[1], 0.6))
            colour = LIGHT_RGB[actor.light(t)] if actor.kind == "traffic_light" else _rgb(actor.colour)
            ax.fill(*corners.T, color=colour, alpha=0.35 + 0.65 * (k + 1) / len(snapshots), zorder=4, ec="black",
                    lw=0.5)
        x, y, _ = actor.motion.pose(t_first)
        label = actor.kind
        if actor.light_schedule:  # the light at the first tick and at the end
            label += f" ({actor.light(t_first)}→{actor.light(episode.t[-1])})"
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 6), textcoords="offset points", zorder=9)

    ax.plot(episode.reference.x, episode.reference.y, color="#666666", ls="--", lw=1.0, zorder=5,
            label="scripted driver (reference)")
    points = np.column_stack([episode.x[start:], episode.y[start:]])
    segments = np.stack([points[:-1], points[1:]], axis=1)
    speeds = LineCollection(segments, cmap="viridis", zorder=6, lw=2.5)
    speeds.set_array(episode.v[start + 1:])
    ax.add_collection(speeds)
    ax.plot(episode.x[: start + 1], episode.y[: start + 1], color="black", lw=1.5, zorder=6, label="before the planner")
    figure.colorbar(speeds, ax=ax, fraction=0.025, pad=0.01, label="speed m/s")

    for k, t in enumerate(snapshots):  # the ego at each snapshot, in its plan's colour
        step = int(round(t / SIM_DT))
        ego = box_corners(episode.x[step], episode.y[step], episode.yaw[step], EGO_LENGTH, EGO_WIDTH)
        ax.fill(*ego.T, color=PLAN_COLOURS[k % len(PLAN_COLOURS)], alpha=0.5, zorder=7, ec="black", lw=0.6)
    for k, i in enumerate(shown):
        plan = episode.plans[i]
        colour = PLAN_COLOURS[k % len(PLAN_COLOURS)]
        ax.plot(*plan.world_path.T, color=colour, lw=1.2, marker=".", ms=2, zorder=8, label=f"plan t={plan.t:.1f} s")

    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=7, ncol=3, framealpha=0.8)
    flags = [name for name, on in (("COLLISION", metrics["collision"]), ("OFF-ROAD", metrics["offroad"]),
                                   ("lane departure", metrics["lane_departure"])) if on]
    violations = metrics["red_light_violations"] + metrics["stop_sign_violations"]
    if violations:
        flags.append(f"{metrics['red_light_violations']} red-light, {metrics['stop_sign_violations']} stop-sign "
                     "violation(s)")
    ax.set_title(f"{episode.event} (seed {episode.seed}, decision {episode.decision}) · {mode} · score "
                 f"{metrics['score']:.2f} · progress {metrics['progress']:.2f} · min TTC {metrics['min_ttc_s']:.1f} s"
                 + (" · " + ", ".join(flags) if flags else ""), fontsize=9)
    figure.text(0.05, (text_height - 0.4) / total, text, fontsize=7.5, va="top", family="monospace")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _shown_plans(episode: Episode) -> list[int]:
    if not episode.plans:
        return []
    count = min(SHOWN_PLANS, len(episode.plans))
    return sorted(set(np.linspace(0, len(episode.plans) - 1, count).round().astype(int).tolist()))


def _draw_road(ax, route: Route, episode: Episode) -> None:
    """Carriageway, edge lines and dashed lane lines of a route; past a lane end (merge) lane 0
    is gone."""
    ss = np.arange(0.0, route.length, 1.0)
    right, left = route.edge_offsets()
    lane_end = episode.world.lane_end_s if route is episode.world.route else None
    lane_end = route.length if lane_end is None else lane_end
    right_edge = np.where(ss <= lane_end, right, 0.5 * route.lane_width)
    rx, ry, _ = route.pose(ss, right_edge)
    lx, ly, _ = route.pose(ss, left)
    ax.fill(np.concatenate([rx, lx[::-1]]), np.concatenate([ry, ly[::-1]]), color="#9a9a9a", zorder=1, lw=0)
    ax.plot(rx, ry, color="white", lw=1.0, zorder=2)
    ax.plot(lx, ly, color="white", lw=1.0, zorder=2)
    for lane in range(1, route.num_lanes):
        keep = ss <= lane_end
        mx, my, _ = route.pose(ss[keep], (lane - 0.5) * route.lane_width)
        ax.plot(mx, my, color="white", lw=0.8, ls=(0, (3, 6)), zorder=2)


def _printable(text: str) -> str:
    """A CoC as the font can draw it (an untrained model's CoC may hold control characters)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _rgb(bgr) -> tuple[float, float, float]:
    """The world's colours are BGR (OpenCV order)."""
    b, g, r = bgr
    return r / 255, g / 255, b / 255
