"""`chain-spec-eval target`: decision accuracy (overall and per speed state: stopped,
starting, creeping, mid-turn), whether the CoC's stated speed state matches the history, the
share of malformed CoCs (grammar check), CoC exact match, ADE/FDE against constant velocity,
minADE over the trajectory samples in sampling mode, and stage latency.

    chain-spec-eval target --data DATA --split test --json OUT [--models models]
    chain-spec-eval target --data DATA --decoding sample --num-traj-samples 6 ...   # Alpamayo's rollout
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
from .metrics import constant_velocity, displacement_errors, min_displacement_errors
from .paths import default_models_dir
from .planner import Planner
from .scenarios.coc import check_grammar, decision_from_coc, speed_statement_matches
from .scenarios.scene import ego_state_from_history
from .training.greedy import cached_greedy_cocs
from .trajectory import history_speeds

CASES = ("stopped", "starting", "creeping", "mid-turn")


def load_planner(models: Path, backend: str = "torch", drafter: str = "none", draft_dir: str | None = None,
                 data: str | None = None, k: int = DEFAULT_K, expert_steps: int | None = None,
                 draft_int8: bool = True) -> Planner:
    """`planner.load_planner`, plus the n-gram baseline drafter (`drafter="ngram"`), which counts
    the target's greedy CoCs on the training split of `data`."""
    if drafter != "ngram":
        return planner_module.load_planner(models, backend, drafter, draft_dir, k, expert_steps, draft_int8=draft_int8)
    if data is None:
        raise ValueError("the n-gram drafter needs a dataset to count the target's CoCs on")
    planner = planner_module.load_planner(models, backend, "none", k=k, expert_steps=expert_steps)
    builder = planner.builder
    table = load_split(data, "train", limit=2000)
    corpus = cached_greedy_cocs(Path("runs/greedy_cache"), "train", load_target_model(Path(models)), builder, table)
    planner.drafter = NgramDrafter([c + [builder.cot_end_id] for c in corpus], builder.tokenizer.vocab_size)
    return planner


def scene_cases(scene: dict) -> list[str]:
    """The CASES a scene belongs to, read from its history as the world defines them."""
    state = ego_state_from_history(scene["history_xyz"], float(scene["speed"]))
    return [case for case in CASES if state.state == case or (case == "mid-turn" and state.road == "turn")]


def evaluate_target(planner: Planner, table, limit: int | None = None) -> dict:
    n = min(len(table), limit or len(table))
    rows, cv_rows, min_rows, timings = [], [], [], []
    correct = exact = malformed = speed_matches = 0
    by_case = {case: [0, 0] for case in CASES}  # correct, scenes
    malformed_examples = []
    for i in tqdm(range(n), desc="scenes"):
        scene = table.scene(i)
        result = planner.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))
        right = decision_from_coc(result.coc) == scene["primary"]
        correct += right
        for case in scene_cases(scene):
            by_case[case][0] += right
            by_case[case][1] += 1
        exact += result.coc == scene["coc"]
        problems = check_grammar(result.coc)
        malformed += bool(problems)
        if problems and len(malformed_examples) < 10:
            malformed_examples.append({"seed": int(scene["seed"]), "coc": result.coc, "problems": problems})
        speed_matches += speed_statement_matches(result.coc, history_speeds(scene["history_xyz"]))
        rows.append(displacement_errors(result.trajectory_xy, scene["future_xy"]))
        cv_rows.append(displacement_errors(constant_velocity(float(scene["speed"])), scene["future_xy"]))
        min_rows.append(min_displacement_errors(result.samples_xy, scene["future_xy"]))
        timings.append(result.timings_ms)

    def mean(dicts):
        return {k: float(np.mean([d[k] for d in dicts])) for k in dicts[0]}

    latency = {k: {"mean_ms": float(np.mean([t[k] for t in timings])), "p95_ms": float(np.percentile([t[k] for t in timings], 95))}
               for k in timings[0]}
    sampling = planner.sampling
    return {
        "scenes": n,
        "decoding": "greedy" if sampling.greedy else f"sample (temperature {sampling.temperature}, top-p {sampling.top_p})",
        "num_traj_samples": planner.num_traj_samples,
        "decision_accuracy": correct / n,
        "decision_accuracy_by_case": {case: {"accuracy": c / m if m else None, "scenes": m}
                                      for case, (c, m) in by_case.items()},
        "speed_statement_match": speed_matches / n,
        "malformed_coc_rate": malformed / n,
        "malformed_examples": malformed_examples,
        "coc_exact_match": exact / n,
        "trajectory": mean(rows),
        "trajectory_min_over_samples": mean(min_rows),
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
    p.add_argument("--backend", default="torch")
    p.add_argument("--decoding", choices=("greedy", "sample"), default="greedy")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = the model's generation_config")
    p.add_argument("--top-p", type=float, default=0.0, help="0 = the model's generation_config")
    p.add_argument("--num-traj-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        planner = load_planner(Path(args.models), args.backend, expert_steps=args.expert_steps)
        planner.sampling = planner.sampling_for(args.decoding, args.temperature, args.top_p)
        planner.num_traj_samples, planner.seed = args.num_traj_samples, args.seed
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
