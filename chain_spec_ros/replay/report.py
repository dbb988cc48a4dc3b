"""`chain-spec-report`: what the node did during a replay, from its recorded outputs.

    chain-spec-report OUT [--bag BAG] [--json report.json] [--png report.png]

OUT is a bag written by `chain-spec-replay --record`; BAG is the drive it was planned on
(default: the one named in OUT's metadata). The report has:

- latency percentiles (p50, p95, p99, mean) of every planner stage and of the node's own
  overhead (message conversion, buffer alignment, prompt assembly, output messages), and that
  overhead as a share of the planning time;
- the speculative decoder's tau and drafted share, when the planner reports them;
- ADE and FDE of each published trajectory against the bag's own future odometry (the ego's
  actual motion after t0, moved into the t0 frame), next to a constant-velocity baseline;
- a picture: the front camera frame at t0 with the planned and the actual trajectory projected
  through the camera's pinhole model, a bird's-eye view, and the CoC with the tokens the draft
  produced and the tokens the target produced (corrections or its own) in two colours.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from ..constants import NS, PERCENTILES
from ..metrics import displacement_errors
from ..trajectory import FUTURE_STEPS, HISTORY_SECONDS, HISTORY_STEPS, STEP_SECONDS, to_local_frame

DRAFT_COLOUR, TARGET_COLOUR = "#1f77b4", "#d62728"


# --- Reading ----------------------------------------------------------------------------------------

def source_bag(out: Path) -> Path | None:
    """The input bag named in a recorded bag's metadata (see chain-spec-replay)."""
    import yaml

    from .replay import SOURCE_KEY

    metadata = Path(out) / "metadata.yaml"
    if not metadata.is_file():
        return None
    info = (yaml.safe_load(metadata.read_text()) or {}).get("rosbag2_bagfile_information", {})
    value = (info.get("custom_data") or {}).get(SOURCE_KEY)
    return Path(value) if value else None


def _stamp(stamp) -> int:
    return int(stamp.sec) * NS + int(stamp.nanosec)


def _by_suffix(messages: dict, suffix: str) -> list:
    for topic, items in messages.items():
        if topic.endswith(suffix):
            return items
    return []


def load_outputs(out: Path) -> dict:
    """Plans keyed by t0 (ns): trajectory, CoC, plan info; plus every diagnostics message."""
    from ..data.bag import read_drive_bag

    messages = read_drive_bag(out)
    plans: dict[int, dict] = {}
    for _, path in _by_suffix(messages, "/trajectory"):
        xy = np.array([(p.pose.position.x, p.pose.position.y) for p in path.poses], dtype=np.float64)
        plans.setdefault(_stamp(path.header.stamp), {}).update(trajectory=xy, frame_id=path.header.frame_id)
    for _, info in _by_suffix(messages, "/plan_info"):
        data = json.loads(info.data)
        plans.setdefault(int(data["t0_ns"]), {}).update(info=data)
    for _, marker_array in _by_suffix(messages, "/markers"):
        for marker in marker_array.markers:
            if marker.text:
                plans.setdefault(_stamp(marker.header.stamp), {}).setdefault("coc", marker.text)
    for plan in plans.values():
        if "info" in plan:
            plan["coc"] = plan["info"]["coc"]
    diagnostics = [d for _, d in messages.get("/diagnostics", [])]
    return {"plans": dict(sorted(plans.items())), "diagnostics": diagnostics,
            "counts": {topic: len(items) for topic, items in messages.items()}}


def load_drive(bag: Path, odom_topic: str = "/odom") -> dict:
    """Odometry [N, 5] (t, x, y, yaw, speed), in header time, and the camera messages."""
    from ..data.bag import odometry_array, read_drive_bag

    messages = read_drive_bag(bag)
    if odom_topic not in messages:
        raise ValueError(f"{bag}: no {odom_topic} topic (topics: {', '.join(sorted(messages))})")
    odometry = odometry_array(messages[odom_topic])
    odometry[:, 3] = np.unwrap(odometry[:, 3])
    cameras = {topic: items for topic, items in messages.items() if "/cameras/" in topic or topic.endswith("image")
               or topic.endswith("compressed")}
    return {"odometry": odometry, "cameras": cameras}


# --- Metrics ------------------------------------------------------------------------------------------

def percentiles(values) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    out = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
    out["mean"] = float(values.mean())
    return out


def future_in_t0_frame(odometry: np.ndarray, t0: float, steps: int = FUTURE_STEPS):
    """The ego's actual positions at t0+0.1 .. t0+steps*0.1 s in the t0 frame, or None when the
    drive ends earlier. Also returns the speed at t0."""
    t = odometry[:, 0]
    times = t0 + STEP_SECONDS * np.arange(0, steps + 1)
    if times[0] < t[0] or times[-1] > t[-1]:
        return None, None
    x, y = np.interp(times, t, odometry[:, 1]), np.interp(times, t, odometry[:, 2])
    yaw = np.interp(t0, t, odometry[:, 3])
    local = to_local_frame(np.stack([x[1:], y[1:]], axis=1), (x[0], y[0], yaw))
    return local, float(np.interp(t0, t, odometry[:, 4]))


def _diagnostic_values(diagnostics) -> dict[str, str]:
    """The values of the newest diagnostics message, all statuses merged."""
    if not diagnostics:
        return {}
    return {kv.key: kv.value for status in diagnostics[-1].status for kv in status.values}


def build_report(out: Path, bag: Path | None = None, odom_topic: str = "/odom") -> tuple[dict, dict, dict]:
    """(report, outputs, drive). Raises ValueError for unusable inputs."""
    bag = bag or source_bag(out)
    if bag is None:
        raise ValueError(f"{out}: the input bag is not named in its metadata; pass --bag")
    outputs, drive = load_outputs(out), load_drive(bag, odom_topic)
    plans = outputs["plans"]
    infos = [p["info"] for p in plans.values() if "info" in p]

    latency: dict[str, dict] = {}
    stages = sorted({k for info in infos for k in info.get("timings_ms", {})})
    for stage in stages:
        values = [info["timings_ms"][stage] for info in infos if stage in info.get("timings_ms", {})]
        latency[stage] = percentiles(values)
    for key in ("node_overhead_ms", "planning_ms", "convert_ms", "assembly_ms", "build_ms"):
        values = [info[key] for info in infos if key in info]
        if values:
            latency[key.removesuffix("_ms")] = percentiles(values)
    overhead = None
    if infos and all("node_overhead_ms" in i and "planning_ms" in i for i in infos):
        shares = [100.0 * i["node_overhead_ms"] / max(i["planning_ms"], 1e-9) for i in infos]
        overhead = {"share_pct_mean": float(np.mean(shares)), "share_pct_p95": float(np.percentile(shares, 95)),
                    "share_pct_total": 100.0 * sum(i["node_overhead_ms"] for i in infos)
                    / max(sum(i["planning_ms"] for i in infos), 1e-9),
                    "ms_mean": float(np.mean([i["node_overhead_ms"] for i in infos]))}

    decoding = None
    stats = [i.get("stats") or {} for i in infos]
    if any("tau" in s for s in stats):
        taus = [s["tau"] for s in stats if isinstance(s.get("tau"), (int, float))]
        drafted = [s["drafted_share"] for s in stats if isinstance(s.get("drafted_share"), (int, float))]
        decoding = {"tau_mean": float(np.mean(taus)) if taus else None,
                    "drafted_share_mean": float(np.mean(drafted)) if drafted else None}
    else:
        sources = [s for i in infos for s in i.get("token_sources", [])]
        if sources:
            decoding = {"drafted_share_mean": sources.count("draft") / len(sources), "tau_mean": None}

    rows, baseline, frames_ok = [], [], 0
    for t0_ns, plan in plans.items():
        if plan.get("frame_id") == "base_link":
            frames_ok += 1
        if "trajectory" not in plan or len(plan["trajectory"]) != FUTURE_STEPS:
            continue
        truth, speed = future_in_t0_frame(drive["odometry"], t0_ns / NS)
        if truth is None:
            continue
        rows.append(displacement_errors(plan["trajectory"], truth))
        straight = np.stack([speed * STEP_SECONDS * np.arange(1, FUTURE_STEPS + 1), np.zeros(FUTURE_STEPS)], 1)
        baseline.append(displacement_errors(straight, truth))

    def mean(dicts):
        return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]} if dicts else None

    diag = _diagnostic_values(outputs["diagnostics"])
    ticks = {k: int(diag[k]) for k in ("ticks", "dropped_ticks", "skipped_ticks", "plans", "errors") if k in diag}
    stamps = sorted(plans)
    span_s = (stamps[-1] - stamps[0]) / NS if len(stamps) > 1 else 0.0
    plan_rate = None
    if "plan_rate_hz" in diag and span_s > 0:
        configured, achieved = float(diag["plan_rate_hz"]), (len(stamps) - 1) / span_s
        plan_rate = {"configured_hz": configured, "achieved_hz": achieved, "share_of_configured": achieved / configured,
                     "planning_p50_ms": latency.get("planning", {}).get("p50")}
    report = {
        "outputs": str(out), "bag": str(bag),
        "plans": len(plans),
        "plans_with_trajectory": sum("trajectory" in p for p in plans.values()),
        "plans_with_coc": sum(bool(p.get("coc") is not None) for p in plans.values()),
        "frames_base_link": frames_ok,
        "t0_span_s": span_s,
        "plan_rate": plan_rate,
        "diagnostics_messages": len(outputs["diagnostics"]),
        "ticks": ticks,
        "backend": infos[-1].get("backend") if infos else None,
        "decoding_mode": infos[-1].get("decoding") if infos else None,
        "latency_ms": latency,
        "node_overhead": overhead,
        "decoding": decoding,
        "trajectory": {"evaluated": len(rows), **(mean(rows) or {})},
        "constant_velocity": mean(baseline),
        "coc_examples": list(dict.fromkeys(p.get("coc", "") for p in plans.values()))[:5],
    }
    return report, outputs, drive


def summary_lines(report: dict) -> list[str]:
    lines = [f"plans: {report['plans']} over {report['t0_span_s']:.1f} s of drive "
             f"({report['backend']}, {report['decoding_mode']})"]
    if report["ticks"]:
        t = report["ticks"]
        lines.append(f"ticks: {t.get('ticks', '?')} (dropped {t.get('dropped_ticks', '?')}, "
                     f"skipped {t.get('skipped_ticks', '?')}, errors {t.get('errors', '?')})")
    if report.get("plan_rate"):
        r = report["plan_rate"]
        planning = "" if r["planning_p50_ms"] is None else f", planning p50 {r['planning_p50_ms']:.0f} ms"
        lines.append(f"plan rate: {r['achieved_hz']:.2f} Hz of {r['configured_hz']:g} Hz configured "
                     f"({100 * r['share_of_configured']:.0f}%, bag time){planning}")
    for stage, stats in report["latency_ms"].items():
        lines.append(f"latency {stage:>17}: p50 {stats['p50']:8.2f}  p95 {stats['p95']:8.2f}  "
                     f"p99 {stats['p99']:8.2f} ms")
    if report["node_overhead"]:
        o = report["node_overhead"]
        lines.append(f"node overhead: {o['ms_mean']:.2f} ms per plan, {o['share_pct_total']:.1f}% of planning time "
                     f"(p95 {o['share_pct_p95']:.1f}%)")
    if report["decoding_mode"] == "target-only":
        lines.append("decoding: target only (tau 1, nothing drafted)")
    elif report["decoding"]:
        d = report["decoding"]
        tau = "n/a" if d.get("tau_mean") is None else f"{d['tau_mean']:.2f}"
        share = "n/a" if d.get("drafted_share_mean") is None else f"{100 * d['drafted_share_mean']:.0f}%"
        lines.append(f"speculative decoding: tau {tau}, drafted share {share}")
    traj, cv = report["trajectory"], report["constant_velocity"]
    if traj.get("evaluated"):
        lines.append(f"trajectory ({traj['evaluated']} plans with 6.4 s of future): ADE {traj['ade_6.4s']:.2f} m, "
                     f"FDE {traj['fde_6.4s']:.2f} m; constant velocity ADE {cv['ade_6.4s']:.2f} m, "
                     f"FDE {cv['fde_6.4s']:.2f} m")
    else:
        lines.append("trajectory: no plan has 6.4 s of recorded future to compare with")
    return lines


# --- Picture ------------------------------------------------------------------------------------------

def project_to_image(xy: np.ndarray, camera, width: int, height: int) -> np.ndarray:
    """Ground points (x, y, 0) in base_link -> pixel (u, v) [N, 2]; points behind the camera are nan."""
    K = camera.intrinsics(width, height)
    c, s = math.cos(camera.yaw), math.sin(camera.yaw)
    dx, dy = xy[:, 0] - camera.x, xy[:, 1] - camera.y
    forward, left, up = c * dx + s * dy, -s * dx + c * dy, -camera.z * np.ones(len(xy))
    pts = np.stack([-left, -up, forward], axis=1)
    uv = np.full((len(xy), 2), np.nan)
    ahead = forward > 0.5
    uv[ahead, 0] = K[0, 0] * pts[ahead, 0] / pts[ahead, 2] + K[0, 2]
    uv[ahead, 1] = K[1, 1] * pts[ahead, 1] / pts[ahead, 2] + K[1, 2]
    return uv


def _camera_frame(drive: dict, camera_name: str, t0_ns: int):
    import cv2

    from ..sensing import decode_compressed, image_from_raw

    topics = [t for t in drive["cameras"] if f"/{camera_name}/" in t] or list(drive["cameras"])
    if not topics:
        return None
    items = drive["cameras"][topics[0]]
    best = min(items, key=lambda item: abs(_stamp(item[1].header.stamp) - t0_ns))[1]
    if hasattr(best, "format"):
        return decode_compressed(best.format, best.data)
    image = image_from_raw(best)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)[:, :, ::-1]


def _printable(token: str) -> str:
    return "".join(ch if ch.isprintable() else " " for ch in token)


def _coloured_tokens(ax, tokens: list[str], sources: list[str], fontsize: float = 9.0, top: float = 0.80,
                     line_height: float = 0.16) -> None:
    """The CoC token by token: draft tokens in one colour, target tokens in the other. Each
    token starts where the rendered text of its line so far ends, so tokens join exactly."""
    renderer = ax.figure.canvas.get_renderer()
    probe = ax.text(0.01, 0, "", fontsize=fontsize, family="monospace", transform=ax.transAxes)

    def width(text: str) -> float:
        if not text:
            return 0.0
        probe.set_text(text.replace(" ", "\u00a0"))  # keep leading/trailing spaces in the measure
        return probe.get_window_extent(renderer).transformed(ax.transAxes.inverted()).width

    line, row = "", 0
    for token, source in zip(tokens, sources):
        text = _printable(token)
        if not text:
            continue
        if line and 0.01 + width(line + text.rstrip()) > 0.99:
            line, row = "", row + 1
            text = text.lstrip() or text
        ax.text(0.01 + width(line), top - row * line_height, text.replace(" ", "\u00a0"),
                color=DRAFT_COLOUR if source == "draft" else TARGET_COLOUR, fontsize=fontsize, family="monospace",
                transform=ax.transAxes, va="top")
        line += text
    probe.remove()


def draw_report(report: dict, outputs: dict, drive: dict, png: Path, index: int | None = None,
                camera_name: str = "front_wide") -> int:
    """Draw one plan (default: the middle one with a full future) to `png`. Returns its t0 (ns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..scenarios.render import DEFAULT_CAMERAS

    plans = outputs["plans"]
    candidates = [t for t, p in plans.items() if "trajectory" in p]
    if not candidates:
        raise ValueError("no trajectory was recorded; nothing to draw")
    with_future = [t for t in candidates if future_in_t0_frame(drive["odometry"], t / NS)[0] is not None]
    pool = with_future or candidates
    t0_ns = pool[len(pool) // 2] if index is None else candidates[max(0, min(index, len(candidates) - 1))]
    plan = plans[t0_ns]
    planned = plan["trajectory"]
    truth, _ = future_in_t0_frame(drive["odometry"], t0_ns / NS)
    info = plan.get("info", {})

    fig = plt.figure(figsize=(11, 6.2), dpi=110)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 1.25], width_ratios=[1.6, 1])
    cam_ax, bev_ax, text_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])

    image = _camera_frame(drive, camera_name, t0_ns)
    camera = next((c for c in DEFAULT_CAMERAS if c.name == camera_name), DEFAULT_CAMERAS[0])
    if image is not None:
        h, w = image.shape[:2]
        cam_ax.imshow(image[:, :, ::-1], interpolation="nearest", extent=(0, w, h, 0))
        for xy, style, label in ((truth, "g-", "actual future"), (planned, "r-", "planned")):
            if xy is None:
                continue
            uv = project_to_image(np.vstack([[camera.x + 0.6, 0.0], xy]), camera, w, h)
            cam_ax.plot(uv[:, 0], uv[:, 1], style, lw=2, label=label)
        cam_ax.set_xlim(0, w)
        cam_ax.set_ylim(h, 0)
        cam_ax.legend(fontsize=7, loc="lower right")
    start = drive["odometry"][0, 0]
    cam_ax.set_title(f"{camera.name} at t0 = bag start + {t0_ns / NS - start:.1f} s", fontsize=9)
    cam_ax.set_axis_off()

    history = None
    odometry = drive["odometry"]
    times = t0_ns / NS - STEP_SECONDS * np.arange(HISTORY_STEPS, -1, -1)
    if times[0] >= odometry[0, 0]:
        x, y = np.interp(times, odometry[:, 0], odometry[:, 1]), np.interp(times, odometry[:, 0], odometry[:, 2])
        yaw = np.interp(times[-1], odometry[:, 0], odometry[:, 3])
        history = to_local_frame(np.stack([x, y], 1), (x[-1], y[-1], yaw))
    if history is not None:
        bev_ax.plot(-history[:, 1], history[:, 0], "k.-", ms=3, label=f"history ({HISTORY_SECONDS:g} s)")
    if truth is not None:
        bev_ax.plot(-truth[:, 1], truth[:, 0], "g-", label="actual future")
    bev_ax.plot(-planned[:, 1], planned[:, 0], "r--", label="planned")
    bev_ax.plot([0], [0], "ks", ms=6)
    bev_ax.set_aspect("equal", adjustable="datalim")
    bev_ax.set_xlabel("right (m)", fontsize=8)
    bev_ax.set_ylabel("forward (m)", fontsize=8)
    bev_ax.tick_params(labelsize=7)
    bev_ax.legend(fontsize=7)
    bev_ax.set_title("bird's-eye view, t0 frame", fontsize=9)

    text_ax.set_axis_off()
    fig.tight_layout()  # before the token layout, which measures text against the final axes
    tokens, sources = info.get("tokens") or [], info.get("token_sources") or []
    stats = info.get("stats") or {}
    header = "chain of causation"
    if "tau" in stats:
        header += f"   (tau {stats['tau']:.2f}, drafted {100 * stats.get('drafted_share', 0):.0f}%)"
    text_ax.text(0.01, 0.98, header, fontsize=9, weight="bold", transform=text_ax.transAxes, va="top")
    if tokens and len(sources) == len(tokens):
        _coloured_tokens(text_ax, tokens, sources)
        text_ax.text(0.01, 0.2, "drafted by the routine reasoner (draft)", color=DRAFT_COLOUR, fontsize=8,
                     transform=text_ax.transAxes)
        text_ax.text(0.30, 0.2, "produced or corrected by the target", color=TARGET_COLOUR, fontsize=8,
                     transform=text_ax.transAxes)
    else:
        text_ax.text(0.01, 0.80, _printable(plan.get("coc", "")), fontsize=9, family="monospace",
                     transform=text_ax.transAxes, va="top", wrap=True)
    overhead = report.get("node_overhead")
    footer = []
    if "planning" in report["latency_ms"]:
        footer.append(f"planning p50 {report['latency_ms']['planning']['p50']:.0f} ms")
    if overhead:
        footer.append(f"node overhead {overhead['share_pct_total']:.1f}%")
    if report["trajectory"].get("evaluated"):
        footer.append(f"ADE {report['trajectory']['ade_6.4s']:.2f} m, FDE {report['trajectory']['fde_6.4s']:.2f} m "
                      f"over {report['trajectory']['evaluated']} plans")
    text_ax.text(0.01, 0.02, "   ".join(footer), fontsize=8, transform=text_ax.transAxes)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return t0_ns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="bag recorded by chain-spec-replay --record")
    parser.add_argument("--bag", type=Path, help="the replayed input bag (default: from OUT's metadata)")
    parser.add_argument("--json", type=Path, help="write the report as JSON")
    parser.add_argument("--png", type=Path, help="draw the report picture")
    parser.add_argument("--index", type=int, help="which plan to draw (default: the middle one)")
    parser.add_argument("--camera", default="front_wide", help="camera to draw (default front_wide)")
    parser.add_argument("--odom-topic", default="/odom")
    args = parser.parse_args(argv)
    try:
        if not args.out.exists():
            raise FileNotFoundError(f"recorded bag not found: {args.out}")
        report, outputs, drive = build_report(args.out, args.bag, args.odom_topic)
        if args.png:
            report["picture_t0_ns"] = draw_report(report, outputs, drive, args.png, args.index, args.camera)
    except (FileNotFoundError, ValueError) as error:
        print(f"chain-spec-report: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print("\n".join(summary_lines(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
