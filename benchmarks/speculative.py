"""Speculative vs target-only CoC decoding on the same scenes, same backend, in one run.

    .venv/bin/python benchmarks/speculative.py --data DATA --split test --json OUT [--drafter eagle|ngram]
        [--backend torch|onnxruntime|tensorrt] [--draft-fp32]

For every scene the planner runs twice, target-only and speculative, alternating which goes
first. It reports tau (tokens decided per target pass), the drafted share of CoC tokens,
how many speculative CoCs are identical to target-only greedy decoding (a divergence counts
as a `near_tie` only when the target's top-2 logit gap at the first differing token is below
1e-4), the speedup of the CoC decoding stage (summed target-only time / summed speculative
time), the cost ratio c (one draft step / one target decode step), and per-stage times.

With `--decoding sample` (temperature / top-p, default the model's generation_config: 0.6 /
0.98) every scene runs `--repeats` times per mode with seeds 0.., and instead of identity the
report tests that both modes sample the same law: a chi-square homogeneity test of the decisions
their CoCs state (`decision_p_value`; a p-value above 0.01 means no difference detected).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain_spec_ros.constants import DEFAULT_K  # noqa: E402
from chain_spec_ros.data.dataset import load_split  # noqa: E402
from chain_spec_ros.evaluate import load_planner  # noqa: E402
from chain_spec_ros.metrics import chi_square_homogeneity_p_value  # noqa: E402
from chain_spec_ros.scenarios.coc import decision_from_coc  # noqa: E402
from chain_spec_ros.paths import default_models_dir  # noqa: E402
from chain_spec_ros.planner import Planner  # noqa: E402

NEAR_TIE = 1e-4


def top2_gap_at_divergence(planner: Planner, scene: dict, reference: list[int], other: list[int]) -> float:
    """The target's top-2 logit gap (one token at a time) at the first index where the two CoCs differ."""
    first = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), min(len(reference), len(other)))
    prompt = planner.builder.build(scene["images"], scene["history_tokens"])
    target = planner.target
    target.start(len(prompt) + len(reference) + 2)
    logits, _ = target.prefill(prompt.input_ids, target.encode_images(prompt.images), prompt.mrope_positions)
    for token in reference[:first]:  # one token at a time, as target-only decoding does
        logits, _ = target.decode([token], prompt.rope_delta)
        logits = logits[-1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def run(planner_target: Planner, planner_spec: Planner, table, limit: int | None, warmup: int = 3,
        repeats: int = 1) -> dict:
    n = min(len(table), limit or len(table))
    for i in range(min(warmup, n)):  # first calls pay allocator and kernel-selection costs
        scene = table.scene(i)
        planner_target.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))
        planner_spec.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))
    totals = {"target": {}, "speculative": {}}
    identical = near_tie = produced = passes = proposed = drafted = tokens = target_tokens = 0
    draft_ms = verify_ms = 0.0
    acceptance = None
    divergent, per_run = [], []
    decisions = {"target": {}, "speculative": {}}
    greedy = planner_spec.sampling.greedy
    runs = [(i, r) for i in range(n) for r in range(repeats)]
    for i, repeat in tqdm(runs, desc="scenes"):
        scene = table.scene(i)
        order = [("target", planner_target), ("speculative", planner_spec)]
        if (i + repeat) % 2:
            order.reverse()
        results = {}
        for name, planner in order:
            planner.seed = repeat
            results[name] = planner.plan(scene["images"], scene["history_tokens"], float(scene["speed"]))
            for stage, ms in results[name].timings_ms.items():
                totals[name][stage] = totals[name].get(stage, 0.0) + ms
            decision = str(decision_from_coc(results[name].coc))
            decisions[name][decision] = decisions[name].get(decision, 0) + 1
        base, spec = results["target"], results["speculative"]
        target_tokens += len(base.coc_ids)
        if base.coc_ids == spec.coc_ids:
            identical += 1
        elif greedy:
            gap = top2_gap_at_divergence(planner_target, scene, base.coc_ids, spec.coc_ids)
            near_tie += gap < NEAR_TIE
            divergent.append({"seed": int(scene["seed"]), "top2_gap": gap, "target": base.coc, "speculative": spec.coc})
        stats = spec.stats
        per_run.append({"produced": round(stats["tau"] * stats["target_passes"]), "passes": stats["target_passes"],
                        "drafted": spec.token_sources.count("draft"), "tokens": len(spec.token_sources)})
        passes += stats["target_passes"]
        proposed += stats["proposed"]
        produced += round(stats["tau"] * stats["target_passes"])
        drafted += spec.token_sources.count("draft")
        tokens += len(spec.token_sources)
        draft_ms += stats["draft_ms"]
        verify_ms += stats["verify_ms"]
        rates = np.array(stats["acceptance_by_position"]) * stats["target_passes"]
        acceptance = rates if acceptance is None else acceptance + rates
    runs_done = len(runs)
    mean = {name: {stage: ms / runs_done for stage, ms in stages.items()} for name, stages in totals.items()}
    categories = sorted(set(decisions["target"]) | set(decisions["speculative"]))
    counts = {name: [found.get(c, 0) for c in categories] for name, found in decisions.items()}
    target_step_ms = totals["target"]["decode"] / max(target_tokens, 1)
    draft_step_ms = draft_ms / max(proposed, 1)
    return {
        "scenes": n,
        "runs_per_mode": runs_done,
        "decoding": "greedy" if greedy else {"temperature": planner_spec.sampling.temperature,
                                             "top_p": planner_spec.sampling.top_p},
        "k": planner_spec.k,
        "tau": produced / max(passes, 1),
        "proposed_per_pass": proposed / max(passes, 1),
        "drafted_share": drafted / max(tokens, 1),
        "identical": identical,
        "total": runs_done,
        "decisions": {"categories": categories, **counts},
        "decision_p_value": chi_square_homogeneity_p_value(counts["target"], counts["speculative"]),
        "near_tie": near_tie,
        "speedup": totals["target"]["decode"] / totals["speculative"]["decode"],
        "cost_ratio": draft_step_ms / target_step_ms,
        "acceptance_by_position": (acceptance / max(passes, 1)).tolist(),
        "draft_ms_per_scene": draft_ms / runs_done,
        "verify_ms_per_scene": verify_ms / runs_done,
        "stages_ms": mean,
        "divergent": divergent[:20],
        "per_run": per_run,  # scene by scene (repeats in order): what bootstrap intervals resample
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", default=str(default_models_dir()))
    parser.add_argument("--drafter", choices=("eagle", "ngram"), default="eagle")
    parser.add_argument("--draft-dir", help="EAGLE draft directory (default MODELS/draft)")
    parser.add_argument("--k", type=int, default=DEFAULT_K)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--decoding", choices=("greedy", "sample"), default="greedy")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = the model's generation_config")
    parser.add_argument("--top-p", type=float, default=0.0, help="0 = the model's generation_config")
    parser.add_argument("--repeats", type=int, default=1, help="runs per scene and mode (seeds 0..)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, or the size of ONNX Runtime's one pool")
    parser.add_argument("--draft-fp32", action="store_true",
                        help="ONNX Runtime on the CPU: run the fp32 draft graphs instead of their int8 twins")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    speculative = load_planner(Path(args.models), args.backend, args.drafter, args.draft_dir, args.data, args.k,
                               draft_int8=not args.draft_fp32)
    draft_engine = getattr(speculative.drafter, "engine", None)
    target_only = Planner(speculative.target, speculative.builder)  # same engine, same backend
    for planner in (speculative, target_only):
        planner.sampling = speculative.sampling_for(args.decoding, args.temperature, args.top_p)
    table = load_split(args.data, args.split, limit=args.limit)
    report = {"drafter": args.drafter, "draft_dir": args.draft_dir, "backend": speculative.backend,
              "threads": args.threads, "draft_int8": bool(draft_engine is not None and draft_engine.int8_weights),
              **run(target_only, speculative, table, args.limit, repeats=args.repeats)}
    text = json.dumps(report, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k not in ("divergent", "stages_ms", "per_run")}, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
