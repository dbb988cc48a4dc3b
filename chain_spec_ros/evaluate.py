"""`chain-spec-eval target`: decision accuracy, CoC exact match, ADE/FDE and stage latency.

    chain-spec-eval target --data DATA --split test --json OUT [--models models]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import planner as planner_module
from .constants import DEFAULT_K
from .data.dataset import load_split
from .drafters import NgramDrafter
from .engines.factory import load_target_model
from .metrics import constant_velocity, displacement_errors
from .paths import default_models_dir
from .planner import Planner
from .scenarios.coc import decision_from_coc
from .training.greedy import cached_greedy_cocs


def load_planner(models: Path, backend: str = "torch", drafter: str = "none", draft_dir: str | None = None,
                 data: str | None = None, k: int = DEFAULT_K, expert_steps: int | None = None) -> Planner:
    """`planner.load_planner`, plus the n-gram baseline drafter (`drafter="ngram"`), which counts
    the target's greedy CoCs on the training split of `data`."""
    if drafter != "ngram":
        return planner_module.load_planner(models, backend, drafter, draft_dir, k, expert_steps)
    if data is None:
        raise ValueError("the n-gram drafter needs a dataset to count the target's CoCs on")
    planner = planner_module.load_planner(models, backend, "none", k=k, expert_steps=expert_steps)
    builder = planner.builder
    table = load_split(data, "train", limit=2000)
    corpus = cached_greedy_cocs(Path("runs/greedy_cache"), "train", load_target_model(Path(models)), builder, table)
    planner.drafter = NgramDrafter([c + [builder.cot_end_id] for c in corpus], builder.tokenizer.vocab_size)
    return planner


def evaluate_target(planner: Planner, table, limit: int | None = None) -> dict:
    n = min(len(table), limit or len(table))
    rows, cv_rows, timings = [], [], []
    correct = exact = 0
    for i in tqdm(range(n), desc="scenes"):
        scene = table.scene(i)
        result = planner.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))
        correct += decision_from_coc(result.coc) == scene["primary"]
        exact += result.coc == scene["coc"]
        rows.append(displacement_errors(result.trajectory_xy, scene["future_xy"]))
        cv_rows.append(displacement_errors(constant_velocity(float(scene["speed"])), scene["future_xy"]))
        timings.append(result.timings_ms)

    def mean(dicts):
        return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}

    latency = {k: {"mean_ms": float(np.mean([t[k] for t in timings])), "p95_ms": float(np.percentile([t[k] for t in timings], 95))}
               for k in timings[0]}
    return {
        "scenes": n,
        "decision_accuracy": correct / n,
        "coc_exact_match": exact / n,
        "trajectory": mean(rows),
        "constant_velocity": mean(cv_rows),
        "latency_cpu": latency,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chain-spec-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("target", help="evaluate the target VLA alone")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--models", default=str(default_models_dir()))
    p.add_argument("--limit", type=int)
    p.add_argument("--expert-steps", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        planner = load_planner(Path(args.models), expert_steps=args.expert_steps)
        table = load_split(args.data, args.split, limit=args.limit)
    except (FileNotFoundError, ValueError) as error:
        print(f"chain-spec-eval: error: {error}", file=sys.stderr)
        return 2
    report = evaluate_target(planner, table, args.limit)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
