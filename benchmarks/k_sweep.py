"""CoC speedup at several draft lengths k, interleaved on the same scenes in one run.

    .venv/bin/python benchmarks/k_sweep.py --data DATA --split test --limit 60 --ks 10,12,14,16 \
        [--backend onnxruntime [--fp32-draft-too]] [--json OUT] [--png OUT]

Separate runs of benchmarks/speculative.py drift with the host by more than the differences
between neighbouring k. Here every scene is decoded target-only and at every k, in an order that
rotates from scene to scene, within one process and on the same engines, so all the ratios share
the host's state. Per k: the CoC speedup (summed target-only decoding time / summed speculative
time) with a scene bootstrap interval, its paired difference to the default k (the interval
excludes 0 only for a real difference), tau, drafts proposed per pass, and whether every CoC
equals target-only decoding. `draft_k` is a runtime parameter of the node: this is how to choose
it for a machine. With `--fp32-draft-too` (ONNX Runtime on the CPU, whose draft runs int8 weights)
every k also runs with the fp32 draft graphs on the same target engine (rows `k=N fp32`), so the
paired difference measures what the int8 draft gains.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain_spec_ros.constants import DEFAULT_K  # noqa: E402
from chain_spec_ros.data.dataset import load_split  # noqa: E402
from chain_spec_ros.drafters import EagleDrafter  # noqa: E402
from chain_spec_ros.engines.factory import build_engines  # noqa: E402
from chain_spec_ros.metrics import bootstrap_ratio  # noqa: E402
from chain_spec_ros.paths import default_models_dir  # noqa: E402
from chain_spec_ros.planner import Planner, load_planner  # noqa: E402


def sweep(speculative: Planner, ks: list[int], table, limit: int | None, warmup: int = 3,
          fp32: Planner | None = None) -> dict:
    """Decode every scene target-only and at each k (rotating the order per scene), and with the
    `fp32` planner (same target engine, another draft engine) too when given; per-scene
    decoding times, tokens decided, target passes and drafts proposed per mode."""
    modes = [("target", Planner(speculative.target, speculative.builder), None)]
    modes += [(f"k={k}", speculative, k) for k in ks] + [(f"k={k} fp32", fp32, k) for k in ks if fp32 is not None]
    n = min(len(table), limit or len(table))

    def plan(planner: Planner, k: int | None, scene: dict):
        if k is not None:
            planner.k = k
        return planner.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))

    for i in range(min(warmup, n)):  # first calls pay allocator and kernel-selection costs
        for _, planner, k in modes:
            plan(planner, k, table.scene(i))
    runs = {name: [] for name, _, _ in modes}
    for i in tqdm(range(n), desc="scenes"):
        scene = table.scene(i)
        turn = i % len(modes)
        results = {name: plan(planner, k, scene) for name, planner, k in modes[turn:] + modes[:turn]}
        reference = results["target"].coc_ids
        for name, result in results.items():
            stats = result.stats
            runs[name].append({"decode_ms": result.timings_ms["decode"], "identical": result.coc_ids == reference,
                               "produced": round(stats.get("tau", 0.0) * stats.get("target_passes", 0)),
                               "passes": stats.get("target_passes", 0), "proposed": stats.get("proposed", 0)})
    return runs


def report(runs: dict, reference: str) -> dict:
    target_ms = [r["decode_ms"] for r in runs["target"]]
    rows = {}
    for name, scenes in runs.items():
        if name == "target":
            continue
        spec_ms = [r["decode_ms"] for r in scenes]
        speedup, low, high = bootstrap_ratio(target_ms, spec_ms)
        passes = sum(r["passes"] for r in scenes)
        rows[name] = {"speedup": speedup, "speedup_interval": [low, high],
                      "tau": sum(r["produced"] for r in scenes) / max(passes, 1),
                      "proposed_per_pass": sum(r["proposed"] for r in scenes) / max(passes, 1),
                      "identical": sum(r["identical"] for r in scenes), "scenes": len(scenes),
                      "coc_ms_per_scene": sum(spec_ms) / len(spec_ms)}
        if name != reference and reference in runs:
            other = [r["decode_ms"] for r in runs[reference]]
            difference, low, high = bootstrap_ratio(target_ms, spec_ms, target_ms, other)
            rows[name][f"minus_{reference}"] = {"difference": difference, "interval": [low, high],
                                                "significant": not low <= 0.0 <= high}
    return {"target_coc_ms_per_scene": sum(target_ms) / len(target_ms), "rows": rows}


def plot(result: dict, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    tau_axis = ax.twinx()
    for suffix, color, tau_color, shift in (("", "tab:blue", "tab:orange", 0.0), (" fp32", "tab:gray", "tab:brown", 0.15)):
        rows = {name: row for name, row in result["rows"].items() if name.endswith(suffix) and (suffix or " " not in name)}
        if not rows:
            continue
        ks = [int(name.split("=")[1].split()[0]) + shift for name in rows]  # fp32 beside int8, not on it
        speedups = [r["speedup"] for r in rows.values()]
        errors = [[s - r["speedup_interval"][0] for s, r in zip(speedups, rows.values())],
                  [r["speedup_interval"][1] - s for s, r in zip(speedups, rows.values())]]
        ax.errorbar(ks, speedups, yerr=errors, marker="o", capsize=3, color=color, label=f"CoC speedup{suffix}")
        tau_axis.plot(ks, [r["tau"] for r in rows.values()], marker="s", color=tau_color, label=f"tau{suffix}")
    ks = result["ks"]
    ax.set_xlim(min(ks) - 1, max(ks) + 1)
    ax.set_xlabel("draft length k")
    ax.set_ylabel("CoC speedup (95% bootstrap)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    tau_axis.set_ylabel("tau", color="tab:orange")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--ks", default="10,12,14,16", help="comma-separated draft lengths")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, or the size of ONNX Runtime's one pool")
    parser.add_argument("--json")
    parser.add_argument("--png", help="speedup (with its interval) and tau against k")
    parser.add_argument("--fp32-draft-too", action="store_true",
                        help="ONNX Runtime on the CPU: also run every k with the fp32 draft graphs (rows 'k=N fp32')")
    args = parser.parse_args(argv)
    try:
        ks = sorted({int(k) for k in args.ks.split(",")})
    except ValueError:
        parser.error(f"--ks takes comma-separated integers, got {args.ks!r}")
    if ks[0] < 1:
        parser.error(f"every k must be at least 1, got {ks[0]}")
    torch.set_num_threads(args.threads)
    speculative = load_planner(Path(args.models), args.backend, "eagle", threads=args.threads)
    fp32 = None
    if args.fp32_draft_too:
        if not speculative.drafter.engine.int8_weights:
            parser.error(f"the {speculative.backend} draft runs fp32 weights already: nothing to compare")
        _, draft = build_engines(Path(args.models), args.backend, Path(args.models) / "draft", threads=args.threads,
                                 draft_int8=False)
        fp32 = Planner(speculative.target, speculative.builder, EagleDrafter(draft, stop_id=speculative.builder.cot_end_id))
    table = load_split(args.data, args.split, limit=args.limit)
    runs = sweep(speculative, ks, table, args.limit, fp32=fp32)
    reference = f"k={DEFAULT_K}" if DEFAULT_K in ks else f"k={ks[-1]}"
    result = {"backend": speculative.backend, "threads": args.threads, "split": args.split, "ks": ks,
              "reference": reference, **report(runs, reference), "per_run": runs}
    for name, row in result["rows"].items():
        versus = row.get(f"minus_{reference}")
        print(f"{name:11s} speedup {row['speedup']:.2f}x [{row['speedup_interval'][0]:.2f}, {row['speedup_interval'][1]:.2f}]"
              f"  tau {row['tau']:.2f}  proposed/pass {row['proposed_per_pass']:.1f}  identical {row['identical']}/{row['scenes']}"
              + (f"  vs {reference} {versus['difference']:+.3f} [{versus['interval'][0]:+.3f}, {versus['interval'][1]:+.3f}]"
                 if versus else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.png:
        plot(result, f"{result['backend']}, {args.limit} {args.split} scenes, interleaved", args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
