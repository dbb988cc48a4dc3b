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

from .data.dataset import load_split
from .models.target import TargetVLA
from .models.tokenizer import ChainTokenizer
from .paths import default_models_dir
from .planner import Planner
from .prompt import PromptBuilder
from .scenarios.coc import decision_from_coc
from .trajectory import STEP_SECONDS

HORIZONS_S = (1.0, 2.0, 3.0, 6.4)


def displacement_errors(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """ADE and FDE at each horizon for one trajectory pair [64, 2]."""
    errors = np.linalg.norm(predicted - truth, axis=-1)
    out = {}
    for horizon in HORIZONS_S:
        n = int(round(horizon / STEP_SECONDS))
        out[f"ade_{horizon:g}s"] = float(errors[:n].mean())
        out[f"fde_{horizon:g}s"] = float(errors[n - 1])
    return out


def constant_velocity(speed: float, steps: int = 64) -> np.ndarray:
    """The baseline: keep the current speed and heading."""
    x = speed * STEP_SECONDS * np.arange(1, steps + 1)
    return np.stack([x, np.zeros_like(x)], axis=1)


def load_planner(models: Path, expert_steps: int | None = None) -> Planner:
    target_dir = models / "target"
    if not (target_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"no target model in {target_dir} (expected config.json + model.safetensors)")
    target = TargetVLA.from_pretrained(target_dir)
    tokenizer = ChainTokenizer.load(models / "tokenizer.json")
    if tokenizer.vocab_size != target.cfg.decoder.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the target expects "
                         f"{target.cfg.decoder.vocab_size}: model and tokenizer do not belong together")
    return Planner(target, PromptBuilder(tokenizer, *target.cfg.vision.grid), expert_steps)


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
        planner = load_planner(Path(args.models), args.expert_steps)
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
