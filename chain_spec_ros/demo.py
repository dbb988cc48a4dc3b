"""`make demo`: plan fresh scenes with the bundled models and show what the planner says.

Scenes come from the simulator with seeds no training run has seen, so the demo is an honest
look at the bundled target: its CoC next to the ground truth, its trajectory against the
simulated future, and the time each stage took on this machine.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from .constants import BACKENDS
from .metrics import displacement_errors
from .paths import default_models_dir
from .planner import ModelLoadError, Planner, load_planner
from .scenarios.coc import decision_from_coc
from .scenarios.events import BUILDERS
from .scenarios.scene import make_scene

DEMO_SEED = 90_000_000  # far from the dataset seeds (base_seed * 10_000_000 + i, base_seed 1..8)


def draw(results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 2.1 * len(results)), gridspec_kw={"width_ratios": [2, 1]})
    for row, (scene, result) in enumerate(results):
        axes[row, 0].imshow(scene.images[1, -1][:, :, ::-1], interpolation="nearest")
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(f"truth: {scene.coc}\nmodel: {result.coc}", fontsize=6.5, loc="left")
        bev = axes[row, 1]
        bev.plot(-scene.future_xy[:, 1], scene.future_xy[:, 0], "g-", label="simulated future")
        bev.plot(-result.trajectory_xy[:, 1], result.trajectory_xy[:, 0], "r--", label="planned")
        bev.set_aspect("equal", adjustable="datalim")
        bev.tick_params(labelsize=6)
    axes[0, 1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-demo", description=__doc__)
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--scenes", type=int, default=len(BUILDERS))
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                        help="inference backend (auto: the fastest available; see engines/factory.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    models = Path(args.models)
    try:
        speculative = load_planner(models, args.backend, drafter="eagle") if (models / "draft").is_dir() else None
        target_only = (Planner(speculative.target, speculative.builder) if speculative
                       else load_planner(models, args.backend, drafter="none"))
    except ModelLoadError as error:
        print(f"chain-spec-demo: error: {error}", file=sys.stderr)
        return 2
    planner = speculative or target_only
    print(f"planner: {'speculative (EAGLE draft, k=%d)' % planner.k if speculative else 'target only'}, "
          f"backend {planner.backend}\n")
    events = list(BUILDERS)
    results, correct, ade, identical, base_ms = [], 0, [], 0, 0.0
    for i in range(args.scenes):
        scene = make_scene(DEMO_SEED + i, event=events[i % len(events)])
        result = planner.plan(scene.images, scene.history_tokens, scene.speed)
        if speculative:  # the same scene without the draft, for the lossless check and the speedup
            base = target_only.plan(scene.images, scene.history_tokens, scene.speed)
            identical += base.coc_ids == result.coc_ids
            base_ms += base.timings_ms["decode"]
        decided = decision_from_coc(result.coc)
        correct += decided == scene.primary
        ade.append(displacement_errors(result.trajectory_xy, scene.future_xy)["ade_3s"])
        mark = "ok " if decided == scene.primary else "MISS"
        print(f"[{mark}] {scene.primary:18s} {result.coc}")
        results.append((scene, result))
    timings = {k: np.mean([r.timings_ms[k] for _, r in results]) for k in results[0][1].timings_ms}
    print(f"\ndecisions right: {correct}/{args.scenes}   mean ADE@3s: {np.mean(ade):.2f} m")
    print("mean stage times (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if speculative:
        spec_ms = sum(r.timings_ms["decode"] for _, r in results)
        tau = np.mean([r.stats["tau"] for _, r in results])
        drafted = np.mean([r.stats["drafted_share"] for _, r in results])
        print(f"speculative CoC identical to target-only: {identical}/{args.scenes}   tau {tau:.2f}   "
              f"drafted share {drafted:.2f}   CoC decoding speedup {base_ms / spec_ms:.2f}x (measured in this run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    draw(results[:8], out / "demo.png")
    print(f"picture: {out / 'demo.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
