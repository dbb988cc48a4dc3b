"""`chain-spec-sim`: closed-loop episodes for every mode on the same seeds, one summary table.

    chain-spec-sim --episodes 16 --json sim.json --png-dir sim_png
    chain-spec-sim --episodes 4 --modes greedy,spec-greedy --duration 10 --events red_light,yield
    chain-spec-sim --ros --episodes 2 --modes spec-greedy --realtime-factor 0.5   # through chain_spec_node

Episode n drives event `events[n % len(events)]` (all 16 event types by default) with seed
`seed * 1000 + n`, the same in every mode. After the run, every speculative greedy mode is
checked against its target-only twin (states and plans bit for bit): a difference is an error
(exit status 1, the first difference named). Speculative sampling is compared with target-only
sampling by their score distributions (two-sample Kolmogorov-Smirnov), lossy shortcuts with
greedy by how many episodes they change and by how much the score moves.

With `--ros` the planner is the real chain_spec_node in its own process, one per mode, over DDS
(`ros_link`): latency then costs simulated time, so twins are compared by their score
distributions, not bit for bit. `--attach` drives a node that is already running instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from ..constants import DEFAULT_K
from ..scenarios.events import BUILDERS
from .episode import (DEFAULT_DURATION_S, DEFAULT_PLAN_RATE_HZ, ClosedLoopError, Episode, EpisodeConfig, run_episode,
                      scripted_episode)
from .metrics import aggregate, episode_metrics
from .modes import DEFAULT_MODES, Mode, configure, parse_modes

TABLE_COLUMNS = (  # (header, aggregate key, format)
    ("score", "score", "{:.3f}"),
    ("collision", "collision_rate", "{:.2f}"),
    ("off-road", "offroad_rate", "{:.2f}"),
    ("lane dep.", "lane_departure_rate", "{:.2f}"),
    ("red light", "red_light_violations", "{:d}"),
    ("stop sign", "stop_sign_violations", "{:d}"),
    ("progress", "progress", "{:.3f}"),
    ("comfort", "comfort_rate", "{:.2f}"),
    ("max jerk", "max_abs_jerk_mean", "{:.2f}"),
    ("max lat a", "max_abs_lat_accel_mean", "{:.2f}"),
    ("min TTC", "min_ttc_s_mean", "{:.2f}"),
    ("decision", "decision_agreement", "{:.2f}"),
    ("p50 ms", "plan_latency_ms_p50", "{:.0f}"),
)


def episode_list(episodes: int, events: list[str], seed: int) -> list[tuple[int, str]]:
    """(seed, event) of every episode: the event types in turn, a seed each."""
    return [(seed * 1000 + n, events[n % len(events)]) for n in range(episodes)]


def driving_digest(episode: Episode) -> str:
    """A short hash of the driven states and plans: equal digests, equal episodes."""
    digest = hashlib.sha256()
    for name in ("x", "y", "yaw", "v", "accel"):
        digest.update(np.ascontiguousarray(getattr(episode, name)).tobytes())
    for plan in episode.plans:
        digest.update(np.asarray(plan.coc_ids, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(plan.trajectory_xy).tobytes())
    return digest.hexdigest()[:16]


def ks_two_sample(a: list[float], b: list[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value (small samples:
    a rough guide, which is all a comparison over a few dozen seeds can be)."""
    a, b = np.sort(a), np.sort(b)
    values = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, values, "right") / len(a) - np.searchsorted(b, values, "right") / len(b)).max())
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101)) if lam > 0 else 1.0
    return d, float(min(max(p, 0.0), 1.0))


def path_divergence(a: Episode, b: Episode) -> float:
    """The largest distance between where two episodes had the ego at the same instant (m)."""
    return float(np.hypot(a.x - b.x, a.y - b.y).max())


def compare_modes(modes: list[Mode], runs: dict[str, list[Episode]], rows: dict[str, list[dict]],
                  exact: bool = True) -> dict:
    """Losslessness, distribution and lossy-shortcut comparisons between the modes run. Not
    `exact` (through ROS, where arrival times differ): twins compared by distribution only."""
    names = {m.name for m in modes}
    comparisons = {}
    for mode in modes:
        twin = mode.lossless_twin or mode.sampled_twin
        if exact and mode.lossless_twin in names:
            pairs = list(zip(runs[mode.name], runs[mode.lossless_twin]))
            different = [(a.seed, a.event, a.first_difference(b)) for a, b in pairs if not a.same_driving(b)]
            comparisons[f"{mode.name} == {mode.lossless_twin}"] = {
                "kind": "bit-identical", "identical": len(pairs) - len(different), "episodes": len(pairs),
                "differences": [{"seed": s, "event": e, "first": f} for s, e, f in different]}
        elif twin in names:
            d, p = ks_two_sample([m["score"] for m in rows[mode.name]], [m["score"] for m in rows[twin]])
            comparisons[f"{mode.name} ~ {twin}"] = {
                "kind": "same distribution", "ks_d": d, "ks_p": p,
                "score_mean": [aggregate(rows[mode.name])["score"], aggregate(rows[twin])["score"]]}
        elif mode.lossy and "greedy" in names:
            pairs = list(zip(runs[mode.name], runs["greedy"]))
            scores = [(a["score"], b["score"]) for a, b in zip(rows[mode.name], rows["greedy"])]
            comparisons[f"{mode.name} vs greedy"] = {
                "kind": "lossy", "episodes": len(pairs),
                "episodes_changed": sum(not a.same_driving(b) for a, b in pairs),
                "score_delta_mean": float(np.mean([a - b for a, b in scores])),
                "path_divergence_m_mean": float(np.mean([path_divergence(a, b) for a, b in pairs])),
                "decision_changed": sum(a["first_decision"] != b["first_decision"]
                                        for a, b in zip(rows[mode.name], rows["greedy"]))}
    return comparisons


def summary_table(report: dict) -> str:
    """The modes as rows, the headline metrics as columns, then the comparisons."""
    width = max(len(name) for name in report["modes"]) + 2
    header = "mode".ljust(width) + " ".join(h.rjust(9) for h, _, _ in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    for name, row in report["modes"].items():
        lines.append(name.ljust(width) + " ".join(("-" if row[key] is None else fmt.format(row[key])).rjust(9)
                                                  for _, key, fmt in TABLE_COLUMNS))
    for name, c in report["comparisons"].items():
        if c["kind"] == "bit-identical":
            lines.append(f"{name}: {c['identical']}/{c['episodes']} episodes identical bit for bit")
        elif c["kind"] == "same distribution":
            lines.append(f"{name}: score means {c['score_mean'][0]:.3f} vs {c['score_mean'][1]:.3f}, "
                         f"KS D {c['ks_d']:.3f} (p {c['ks_p']:.2f})")
        else:
            lines.append(f"{name}: {c['episodes_changed']}/{c['episodes']} episodes changed, score "
                         f"{c['score_delta_mean']:+.3f}, paths apart by {c['path_divergence_m_mean']:.2f} m on "
                         f"average, first decision changed in {c['decision_changed']}")
    return "\n".join(lines)


class InProcessDriver:
    """Episodes driven by the planner loaded in this process, reconfigured per mode."""

    def __init__(self, models: Path, args: argparse.Namespace, modes: list[Mode], config: EpisodeConfig):
        from ..planner import load_planner

        speculative = any(m.speculative for m in modes)
        self.planner = load_planner(models, args.backend, "eagle" if speculative else "none", args.draft, k=args.k,
                                    threads=args.threads)
        self.drafter, self.config = self.planner.drafter, config

    def __enter__(self) -> "InProcessDriver":
        return self

    def __exit__(self, *exc) -> None:
        pass

    @contextmanager
    def mode(self, mode: Mode):
        configure(self.planner, mode, self.drafter)
        yield lambda seed, event: run_episode(self.planner, seed, event, self.config)


def ros_driver(models: Path, args: argparse.Namespace, config: EpisodeConfig):
    from ..scenarios.render import DEFAULT_CAMERAS
    from .ros_link import RosDriver

    if args.ros_domain is not None:
        domain = args.ros_domain
    else:  # attached: where the node runs; launched: a private domain
        domain = int(os.environ.get("ROS_DOMAIN_ID", "0")) if args.attach else 1 + os.getpid() % 101
    parameters = {"backend": args.backend, "draft_k": args.k, "torch_threads": args.threads or 2}
    if args.draft:
        parameters["draft_dir"] = args.draft
    return RosDriver(models, list(DEFAULT_CAMERAS), config, parameters, domain, args.realtime_factor,
                     launch=not args.attach, log_dir=Path(args.json).parent if args.json else None)


def run(args: argparse.Namespace) -> dict:
    import torch

    from ..paths import default_models_dir

    modes = parse_modes(args.modes)
    events = list(BUILDERS) if args.events == "all" else [e.strip() for e in args.events.split(",") if e.strip()]
    unknown = [e for e in events if e not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown event(s) {unknown}; known: {', '.join(BUILDERS)}")
    for flag, value in (("--duration", args.duration), ("--plan-rate", args.plan_rate),
                        ("--realtime-factor", args.realtime_factor), ("--episodes", args.episodes)):
        if not value > 0:
            raise ValueError(f"{flag} must be positive, got {value:g}")
    if args.attach and not args.ros:
        raise ValueError("--attach drives a running chain_spec_node: it needs --ros")
    if args.attach and len([m for m in modes if not m.scripted]) > 1:
        raise ValueError("--attach drives the node as it is configured: give one planner mode")
    if args.ros:
        for mode in modes:
            if not mode.scripted:
                mode.node_parameters()  # a mode the node cannot plan as fails now, not after an hour
    if args.threads:
        torch.set_num_threads(args.threads)
    models = Path(args.models) if args.models else default_models_dir()
    config = EpisodeConfig(duration_s=args.duration, plan_rate_hz=args.plan_rate)
    episodes = episode_list(args.episodes, events, args.seed)
    runs: dict[str, list[Episode]] = {m.name: [] for m in modes}
    rows: dict[str, list[dict]] = {m.name: [] for m in modes}
    started = time.perf_counter()
    with (ros_driver(models, args, config) if args.ros else InProcessDriver(models, args, modes, config)) as driver:
        for mode in modes:
            with (nullcontext(None) if mode.scripted else driver.mode(mode)) as drive_episode:
                for n, (seed, event) in enumerate(episodes):
                    episode = scripted_episode(seed, event, config) if mode.scripted else drive_episode(seed, event)
                    metrics = episode_row(episode, args.ros)
                    runs[mode.name].append(episode)
                    rows[mode.name].append(metrics)
                    if args.png_dir:
                        from .figure import save_episode_png

                        save_episode_png(episode, metrics, mode.name,
                                         Path(args.png_dir) / f"{n:03d}_{event}_{mode.name}.png")
                    print(f"[{time.perf_counter() - started:6.0f} s] {mode.name} episode {n + 1}/{len(episodes)} "
                          f"{event} seed {seed}: score {metrics['score']:.2f}", file=sys.stderr, flush=True)
    summary = {}
    for mode in modes:
        summary[mode.name] = aggregate(rows[mode.name])
        for key in ("tau", *ROS_TIMING):
            values = [m[key] for m in rows[mode.name] if m.get(key) is not None]
            summary[mode.name][key] = float(np.mean(values)) if values else None
    return {
        "config": {"models": str(models), "backend": args.backend if args.ros else driver.planner.backend,
                   "draft": args.draft, "k": args.k, "episodes": len(episodes), "events": events, "seed": args.seed,
                   "duration_s": args.duration, "plan_rate_hz": args.plan_rate, "modes": [m.name for m in modes],
                   "threads": args.threads, "ros": args.ros,
                   "realtime_factor": args.realtime_factor if args.ros else None,
                   "wall_s": time.perf_counter() - started},
        "modes": summary,
        "comparisons": compare_modes(modes, runs, rows, exact=not args.ros),
        "episodes": rows,
    }


ROS_TIMING = ("arrival_s_p50", "pose_error_m_max", "handover_s")


def episode_row(episode: Episode, ros: bool) -> dict:
    """An episode's line of the report: its metrics, digest, CoCs, tau (and ROS timing)."""
    row = episode_metrics(episode)
    row.update(digest=driving_digest(episode), cocs=[plan.coc for plan in episode.plans], tau=_mean_tau(episode))
    if ros:
        row.update(ros_timing(episode))
    return row


def ros_timing(episode: Episode) -> dict:
    """Through ROS: how late plans reached the simulator after their t0 (simulated seconds), how
    far the node's pose at t0 was from the simulator's (its time alignment), and when the node took over."""
    arrivals = [p.received_t - p.t for p in episode.plans if p.received_t is not None]
    errors = [p.pose_error_m for p in episode.plans if p.pose_error_m is not None]
    return {"arrival_s_p50": float(np.median(arrivals)) if arrivals else None,
            "pose_error_m_max": float(max(errors)) if errors else None,
            "handover_s": float(episode.t[episode.start_index])}


def _mean_tau(episode: Episode) -> float | None:
    """Mean tokens per target pass of the speculative plans (None when target-only)."""
    taus = [p.stats["tau"] for p in episode.plans if "tau" in p.stats]
    return float(np.mean(taus)) if taus else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chain-spec-sim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=16, help="episodes per mode (default: one per event type)")
    parser.add_argument("--events", default="all", help="comma-separated event types, or 'all' (default)")
    parser.add_argument("--seed", type=int, default=0, help="base seed: episode n uses seed * 1000 + n")
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                        help=f"closed-loop seconds per episode (default {DEFAULT_DURATION_S:g})")
    parser.add_argument("--plan-rate", type=float, default=DEFAULT_PLAN_RATE_HZ,
                        help=f"planning ticks per simulated second (default {DEFAULT_PLAN_RATE_HZ:g}, the node's)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated modes (default {DEFAULT_MODES}); "
                        "see chain_spec_ros/sim/modes.py")
    parser.add_argument("--models", default="", help="models directory (default: the bundled models)")
    parser.add_argument("--draft", default=None, help="draft directory (default: MODELS/draft)")
    parser.add_argument("--backend", default="auto", help="engine backend (default auto, as the node: the fastest "
                        "available; bit-identity holds between modes on one backend)")
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="tokens drafted per target pass")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for the engines (0 = library default)")
    parser.add_argument("--ros", action="store_true", help="plan with chain_spec_node over DDS (one node per mode, "
                        "launched on a private ROS_DOMAIN_ID) instead of in this process")
    parser.add_argument("--attach", action="store_true", help="with --ros: drive the chain_spec_node already running "
                        "(ROS_DOMAIN_ID from the environment or --ros-domain) instead of launching one")
    parser.add_argument("--ros-domain", type=int, default=None, help="ROS_DOMAIN_ID for --ros")
    parser.add_argument("--realtime-factor", type=float, default=1.0, help="with --ros: simulated seconds per wall "
                        "second (below 1 gives a slow planner more simulated time; default 1, a car's)")
    parser.add_argument("--json", default="", help="write the full report (config, table, comparisons, episodes) here")
    parser.add_argument("--png-dir", default="", help="write a bird's-eye PNG per episode and mode here")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..planner import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except ValueError as error:
        print(f"chain-spec-sim: {error}", file=sys.stderr)
        return 2
    except (ModelLoadError, ClosedLoopError) as error:  # one clear line naming the file or the cause
        print(f"chain-spec-sim: {error}", file=sys.stderr)
        return 2
    print(summary_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    broken = [name for name, c in report["comparisons"].items()
              if c["kind"] == "bit-identical" and c["identical"] != c["episodes"]]
    for name in broken:
        first = report["comparisons"][name]["differences"][0]
        print(f"chain-spec-sim: {name} FAILED: seed {first['seed']} ({first['event']}): {first['first']}",
              file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
